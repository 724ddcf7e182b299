"""Studies: a paper's comparison table as one TOML file, run and reported with statistics.

A study file holds the shared settings (``[study]``: data, training options, folds, seeds,
a preset, ``vars`` substituted into specs), named rows (``[[row]]``: ``name``, ``spec``, its
``base`` row, the ``paper``'s reported mIoU % and ``paper_base`` (its paper's own base
figure, where the base row's paper differs), ``scales`` it runs at, ``train`` options of its
own, a ``note``), ``[[compare]]`` entries (``row``, ``base``, ``note``: paired comparisons
beside each row's own base, e.g. a paper's ablations against each other) and ``[scale.NAME]``
tables whose keys override both (``vars`` merge): precedence [study] < row ``train`` <
[scale.NAME]. Every row of a study runs on the same folds and seeds, so gains are paired over
(fold, seed).

Layout of a study's folder: ``study.json`` (the resolved study; the command and machine of
every invocation that ran runs into it),
``<row slug>/fold<f>_seed<s>/`` (one cv run each: test.json, metrics.csv, config.json,
checkpoints), and from ``report``: ``table.md``, ``table.csv``, ``gains.png`` (and
``comparisons.csv`` where the study has ``[[compare]]`` entries).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import platform
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..registry import SpecError, parse_spec
from .checkpoint import holding, write_atomic, write_text_atomic
from .config import TrainConfig, option_fields
from .cv import check_kept_runs, check_runs_can_start, run_dir, train_and_test
from .data import DataError
from .jobs import job_threads, run_jobs
from .presets import apply_preset
from .train import TrainingError, missing_cpu_units

STUDY_KEYS = {"title", "paper", "folds", "seeds", "preset", "vars"}
ROW_KEYS = {"name", "spec", "base", "paper", "paper_base", "scales", "train", "note"}
COMPARE_KEYS = {"row", "base", "note"}
RUN_DECIDES = {  # training options the study sets per run
    "fold": "every row runs on every fold (set folds)",
    "seed": "the runs use seeds 0 … seeds − 1 (set seeds)"}


class StudyError(DataError):
    """A bad study file or folder; one line naming the file and the key."""


@dataclass
class Row:
    name: str
    spec: str
    base: str | None = None
    paper: float | None = None
    paper_base: float | None = None
    train: dict = field(default_factory=dict)
    note: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "row"


@dataclass
class Study:
    """A study file resolved at one scale."""

    name: str
    scale: str
    title: str
    paper: str
    folds: int
    seeds: int
    config: TrainConfig
    rows: list[Row]
    settings: dict = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)  # {"row", "base", "note"}

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict:
        return {"name": self.name, "scale": self.scale, "title": self.title,
                "paper": self.paper, "folds": self.folds, "seeds": self.seeds,
                "settings": self.settings, "rows": [r.__dict__ for r in self.rows],
                **({"comparisons": self.comparisons} if self.comparisons else {})}


def _fail(path: Path, where: str, message: str):
    raise StudyError(f"{path}: {where}: {message}")


def load_study(path: str | Path, scale: str | None = None) -> Study:
    """Parse and check ``path`` at ``scale`` (None: no scale table); raises StudyError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid TOML ({' '.join(str(e).split())})") from None
    for key in doc:
        if key not in ("study", "row", "compare", "scale"):
            _fail(path, f"[{key}]", "unknown table (expected [study], [[row]], [[compare]], "
                  "[scale.NAME])")
    base = dict(doc.get("study", {}))
    scales = doc.get("scale", {})
    overrides = {}
    if scale is not None:
        if scale not in scales:
            _fail(path, f"--scale {scale}", f"no [scale.{scale}] table (the file has: "
                  f"{', '.join(scales) or 'none'})")
        overrides = dict(scales[scale])
        base["vars"] = {**base.get("vars", {}), **overrides.pop("vars", {})}
        _check_settings(path, overrides, f"[scale.{scale}]")
    settings = _check_settings(path, {**base, **overrides}, "[study]")
    rows = _check_rows(path, doc.get("row", []), scale, settings.get("vars", {}))
    comparisons = _check_comparisons(path, doc.get("compare", []), doc.get("row", []),
                                     {r.name for r in rows})
    train = {k: v for k, v in settings.items() if k not in STUDY_KEYS}
    cfg = apply_preset(TrainConfig(spec=rows[0].spec, **train), settings.get("preset"),
                       set(train))
    cfg.folds = settings.get("folds", cfg.folds)
    for row in rows:  # [study] < row train < [scale.NAME]
        row.train = {**row.train, **{k: v for k, v in overrides.items() if k not in STUDY_KEYS}}
        try:
            replace(cfg, spec=row.spec, **row.train).check()
        except DataError as e:
            _fail(path, f"row {row.name!r}" if row.train else "[study]", str(e))
    return Study(name=path.stem, scale=scale or "default", title=settings.get("title", path.stem),
                 paper=settings.get("paper", ""), folds=cfg.folds,
                 seeds=settings.get("seeds", 1), config=cfg, rows=rows, settings=settings,
                 comparisons=comparisons)


def _check_settings(path: Path, settings: dict, where: str) -> dict:
    known = {name for name, _, _ in option_fields()} | STUDY_KEYS
    for key, value in settings.items():
        if key not in known:
            _fail(path, f"{where} {key}", f"unknown key (valid: {', '.join(sorted(known))})")
        if key in RUN_DECIDES:
            _fail(path, f"{where} {key}", RUN_DECIDES[key])
        if key in ("folds", "seeds") and (not isinstance(value, int) or value < 1):
            _fail(path, f"{where} {key}", f"{value!r} is not a positive integer")
        if key == "vars" and not all(isinstance(v, str) for v in value.values()):
            _fail(path, f"{where} vars", "every variable must be a string")
    return settings


def _check_comparisons(path: Path, entries: list, rows: list, here: set[str]) -> list[dict]:
    """[[compare]] entries as {"row", "base", "note"}; both must name rows of the file, and an
    entry whose rows do not both run at this scale is left out."""
    names = [r.get("name") for r in rows]
    out = []
    for k, entry in enumerate(entries, 1):
        where = f"compare {k}"
        unknown = set(entry) - COMPARE_KEYS
        if unknown:
            _fail(path, f"{where} {sorted(unknown)[0]}",
                  f"unknown key (valid: {', '.join(sorted(COMPARE_KEYS))})")
        for key in ("row", "base"):
            if entry.get(key) not in names:
                _fail(path, f"{where} {key}", f"{entry.get(key)!r} is not a row of this file")
        if entry["row"] == entry["base"]:
            _fail(path, f"{where} base", f"{entry['base']!r} is the row itself")
        if entry["row"] in here and entry["base"] in here:
            out.append({"row": entry["row"], "base": entry["base"], "note": entry.get("note", "")})
    return out


def _check_rows(path: Path, rows: list, scale: str | None, variables: dict) -> list[Row]:
    if not rows:
        _fail(path, "[[row]]", "the study has no rows")
    out, names = [], set()
    for k, row in enumerate(rows, 1):
        where = f"row {k}"
        unknown = set(row) - ROW_KEYS
        if unknown:
            _fail(path, f"{where} {sorted(unknown)[0]}", f"unknown key (valid: "
                  f"{', '.join(sorted(ROW_KEYS))})")
        for key in ("name", "spec"):
            if not isinstance(row.get(key), str):
                _fail(path, f"{where} {key}", "missing (a string)")
        if row["name"] in names:
            _fail(path, f"{where} name", f"{row['name']!r} is used twice")
        names.add(row["name"])
        if scale is not None and "scales" in row and scale not in row["scales"]:
            continue
        try:
            spec = str(parse_spec(row["spec"].format(**variables)))
        except KeyError as e:
            _fail(path, f"{where} spec", f"unknown variable {e} (define it in [study] vars)")
        except SpecError as e:
            _fail(path, f"{where} spec", str(e))
        for key in ("paper", "paper_base"):
            if key in row and not isinstance(row[key], (int, float)):
                _fail(path, f"{where} {key}", "expected the paper's mIoU in % (a number)")
        train = row.get("train", {})
        fields_ = ({name for name, _, _ in option_fields()}
                   - {"data", "classes", "folds", *RUN_DECIDES})
        if not isinstance(train, dict) or set(train) - fields_:
            bad = sorted(set(train) - fields_)[0] if isinstance(train, dict) else train
            _fail(path, f"{where} train", f"{bad!r} is not a training option a row may set")
        out.append(Row(row["name"], spec, row.get("base"), row.get("paper"),
                       row.get("paper_base"), dict(train), row.get("note", "")))
    for r in out:
        if r.base is not None and r.base not in {x.name for x in out}:
            _fail(path, f"row {r.name!r} base", f"{r.base!r} is not a row of this scale")
    if not out:
        _fail(path, "[[row]]", f"no row runs at scale {scale!r}")
    return out


def invocations(info: dict) -> list[dict]:
    """The {command, machine} of every invocation recorded in a study.json (an older file
    holds one: the first)."""
    if "invocations" in info:
        return info["invocations"]
    return [{"command": info["command"], "machine": info["machine"]}] if "command" in info else []


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    bf16 = "emulated" if missing_cpu_units(torch.device("cpu"), "bf16") else "native"
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "cpu_bf16": bf16,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def select_rows(study: Study, patterns: list[str] | None) -> list[Row]:
    """The rows whose names match one of the shell patterns (case-insensitive); all if None."""
    if not patterns:
        return study.rows
    names = [r.name for r in study.rows]
    for pattern in patterns:
        if not fnmatch.filter([n.lower() for n in names], pattern.lower()):
            raise StudyError(f"--rows {pattern!r}: matches no row; the rows are "
                             + ", ".join(repr(n) for n in names))
    return [r for r in study.rows
            if any(fnmatch.fnmatch(r.name.lower(), p.lower()) for p in patterns)]


def run_study(study: Study, out: Path, jobs: int = 1, threads: int | None = None,
              on_run=None, rows: list[str] | None = None, on_start=None) -> None:
    """Train and test every row × fold × seed not finished yet (``jobs`` at a time; every
    row's fold 0 seed 0 first, then fold 1, …), or only the rows matching ``rows`` (shell
    patterns; study.json keeps every row). A run that fails is reported ('row fold f seed
    s: error', TrainingError) after the others. ``on_start(rows, pending)`` is called once
    the study is checked, before anything is written; ``on_run('row fold f seed s', test
    scores)`` as each run finishes. Runs report their progress on stderr (progress_lines)."""
    selected = select_rows(study, rows)
    check_runs_can_start([(replace(study.config, spec=row.spec, folds=study.folds, fold=0,
                                   seed=0, **row.train), f"row {row.name!r}")
                          for row in selected])  # bad data, folds or crops: one line, first
    planned = [(replace(study.config, spec=row.spec, fold=f, seed=s,
                        out=str(run_dir(out / row.slug, f, s)), **row.train),
                f"{row.name} fold {f} seed {s}")
               for s in range(study.seeds) for f in range(study.folds)
               for row in selected]  # fold by fold: a study stopped early has paired runs
    check_kept_runs(planned, setting=lambda name, value: f"study setting {name} = {value}")
    pending = [(cfg, label) for cfg, label in planned
               if not (Path(cfg.out) / "test.json").exists()]
    if on_start:
        on_start(selected, len(pending))
    with holding(out):  # a second study into this folder: refused before it writes anything
        record = out / "study.json"
        ran = invocations(json.loads(record.read_text())) if record.is_file() else []
        this = {"command": shlex.join(["cellseg", *sys.argv[1:]]),
                "machine": {**machine(), "jobs": jobs,
                            "threads_per_run": job_threads(jobs, threads)}}
        if (pending and this not in ran) or not ran:
            ran.append(this)
        write_text_atomic(record, json.dumps({**study.to_json(), "invocations": ran}, indent=2))
        failed = []
        for (cfg, label), ok, value in run_jobs(train_and_test, pending, jobs, threads):
            if not ok:
                failed.append(f"{label}: {value}")
            elif on_run:
                on_run(label, value)
    if failed:
        raise TrainingError(f"{len(failed)} of {len(pending)} runs failed: " + "; ".join(failed))


# ---------------------------------------------------------------- report


def paired_tests(a: list[float], b: list[float]) -> dict:
    """Mean and std of the paired differences a − b, paired t-test and Wilcoxon signed-rank
    p-values (two-sided; None where undefined: fewer than 2 pairs, or all differences 0)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    out = {"n": len(d), "mean": statistics.mean(d) if d else None,
           "std": statistics.stdev(d) if len(d) > 1 else None, "t_p": None, "wilcoxon_p": None}
    if len(d) > 1 and any(x != 0 for x in d):
        if out["std"] > 0:
            out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
        out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    return out


def collect(folder: Path) -> tuple[dict, dict[str, dict[tuple[int, int], dict]]]:
    """study.json and each row's finished runs {(fold, seed): test result}."""
    folder = Path(folder)
    if not (folder / "study.json").is_file():
        raise StudyError(f"{folder}: no study.json (run 'cellseg study run FILE --out {folder}')")
    info = json.loads((folder / "study.json").read_text())
    runs = {}
    for row in info["rows"]:
        slug = Row(**row).slug
        runs[row["name"]] = {
            (f, s): json.loads((run_dir(folder / slug, f, s) / "test.json").read_text())
            for f in range(info["folds"]) for s in range(info["seeds"])
            if (run_dir(folder / slug, f, s) / "test.json").is_file()}
    return info, runs


def run_seconds(folder: Path, info: dict) -> float:
    """Training wall time of every finished run (metrics.csv 'seconds' column), summed."""
    total = 0.0
    for row in info["rows"]:
        for path in (folder / Row(**row).slug).glob("fold*_seed*/metrics.csv"):
            if not (path.parent / "test.json").is_file():  # unfinished: not in the table
                continue
            with open(path) as f:
                total += sum(float(r["seconds"]) for r in csv.DictReader(f))
    return total


def report(folder: Path, out: Path | None = None) -> dict:
    """Write table.md, table.csv and gains.png for the study in ``folder`` (into ``out``)."""
    folder = Path(folder)
    out = Path(out or folder)
    info, runs = collect(folder)
    expected = info["folds"] * info["seeds"]
    classes = next((list(r["iou"]) for rr in runs.values() for r in rr.values()), [])
    rows = []
    for row in info["rows"]:
        results = runs[row["name"]]
        line = {"name": row["name"], "spec": row["spec"], "base": row["base"],
                "runs": len(results), "expected": expected, "note": row.get("note", ""),
                "paper": row.get("paper")}
        for c in classes + ["mIoU"]:
            values = [r["miou"] if c == "mIoU" else r["iou"][c] for r in results.values()]
            values = [v for v in values if v is not None]
            line[c] = (statistics.mean(values) if values else None,
                       statistics.stdev(values) if len(values) > 1 else None)
        if row["base"]:
            line["gain"] = paired_gain(results, runs[row["base"]])
            base_paper = row.get("paper_base")
            if base_paper is None:
                base_paper = next(r.get("paper") for r in info["rows"] if r["name"] == row["base"])
            if row.get("paper") is not None and base_paper is not None:
                line["paper_gain"] = row["paper"] - base_paper
        rows.append(line)
    compared = [compare(c, runs, info) for c in info.get("comparisons", [])]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, classes, out / "table.csv")
    if compared:
        _write_comparisons_csv(compared, out / "comparisons.csv")
    write_text_atomic(out / "table.md", _markdown(info, rows, classes, run_seconds(folder, info),
                                                  compared))
    _plot_gains(info, rows, out / "gains.png", compared)
    return {"rows": rows, "classes": classes, "comparisons": compared}


def paired_gain(runs: dict, base: dict) -> dict:
    """:func:`paired_tests` of the mIoU of ``runs`` against ``base`` ({(fold, seed): test
    result} each) over the (fold, seed) pairs both have."""
    pairs = sorted(set(runs) & set(base))
    return paired_tests([runs[p]["miou"] for p in pairs], [base[p]["miou"] for p in pairs])


def compare(entry: dict, runs: dict, info: dict) -> dict:
    """One [[compare]] entry: the row's mIoU minus the base row's, paired, and the papers'
    difference where both rows carry a paper figure."""
    papers = {r["name"]: r.get("paper") for r in info["rows"]}
    a, b = papers[entry["row"]], papers[entry["base"]]
    return {**entry, "gain": paired_gain(runs[entry["row"]], runs[entry["base"]]),
            "paper_gain": None if a is None or b is None else a - b}


def _pct(value, digits=2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _cell(mean_std) -> str:
    mean, std = mean_std
    if mean is None:
        return "–"
    return _pct(mean) + ("" if std is None else f" ± {_pct(std)}")


def _p(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _write_csv(rows, classes, path: Path) -> None:
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["row", "spec", "base", "runs", *[f"{c}_{k}" for c in classes + ["mIoU"]
                                                   for k in ("mean", "std")],
                "gain_mean", "gain_std", "t_p", "wilcoxon_p", "paper_miou", "paper_gain"])
    for r in rows:
        g = r.get("gain", {})
        w.writerow([r["name"], r["spec"], r["base"] or "", r["runs"],
                    *[v for c in classes + ["mIoU"] for v in r[c]],
                    g.get("mean"), g.get("std"), g.get("t_p"), g.get("wilcoxon_p"),
                    r["paper"], r.get("paper_gain")])
    write_text_atomic(path, table.getvalue())


def _write_comparisons_csv(compared, path: Path) -> None:
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["row", "base", "pairs", "gain_mean", "gain_std", "t_p", "wilcoxon_p",
                "paper_gain", "note"])
    for c in compared:
        g = c["gain"]
        w.writerow([c["row"], c["base"], g["n"], g["mean"], g["std"], g["t_p"],
                    g["wilcoxon_p"], c["paper_gain"], c["note"]])
    write_text_atomic(path, table.getvalue())


def _gain(g) -> str:
    if not g or g["mean"] is None:
        return "–"
    return f"{100 * g['mean']:+.2f}" + ("" if g["std"] is None else f" ± {100 * g['std']:.2f}")


def _machine(m: dict) -> str:
    threads = (f"{m['threads_per_run']} thread(s) a run" if "threads_per_run" in m
               else f"{m.get('torch_threads', '?')} threads")  # an older study.json
    bf16 = {"emulated": ", bf16 emulated (no AVX-512 BF16 or AMX)",
            "native": ", bf16 native (AVX-512 BF16 or AMX)"}.get(m.get("cpu_bf16"), "")
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {threads}{bf16}"
    jobs = f", {m['jobs']} run(s) at a time" if m.get("jobs", 1) > 1 else ""
    return f"{where}{jobs}; torch {m.get('torch', '?')}"


def _markdown(info, rows, classes, seconds, compared=()) -> str:
    ran = [f"- command: `{i['command']}`; machine: {_machine(i['machine'])}"
           for i in invocations(info)] or ["- command: ?"]
    lines = [f"# {info['title']} — scale {info['scale']}", "",
             f"{info.get('paper', '')}", "",
             f"Test IoU % over {info['folds']} folds × {info['seeds']} seed(s) (mean ± std over "
             "runs). Gain: mIoU of the row minus its base row, paired over the same (fold, "
             "seed); p-values of the paired t-test and the Wilcoxon signed-rank test (two-"
             "sided). Paper: the mIoU % the paper reports and its gain over its own base.", "",
             *ran,
             f"- training wall time of the runs: {seconds / 3600:.2f} h", ""]
    head = ["row", "runs", *classes, "mIoU", "gain (pp)", "t-test p", "Wilcoxon p",
            "paper mIoU", "paper gain"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = r.get("gain")
        gain = _gain(g)
        runs = f"{r['runs']}/{r['expected']}"
        paper_gain = r.get("paper_gain")
        lines.append("| " + " | ".join([
            r["name"], runs, *[_cell(r[c]) for c in classes], f"**{_cell(r['mIoU'])}**", gain,
            _p(g and g["t_p"]), _p(g and g["wilcoxon_p"]),
            "–" if r["paper"] is None else f"{r['paper']:.2f}",
            "–" if paper_gain is None else f"{paper_gain:+.2f}"]) + " |")
    if compared:
        lines += ["", "Other paired comparisons (the same statistics over the (fold, seed) pairs "
                  "both rows have; paper: the difference of the two rows' paper figures):", "",
                  "| row | against | pairs | gain (pp) | t-test p | Wilcoxon p | paper gain | "
                  "note |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['row']} | {c['base']} | {c['gain']['n']} | {_gain(c['gain'])} | "
                  f"{_p(c['gain']['t_p'])} | {_p(c['gain']['wilcoxon_p'])} | "
                  + ("–" if c["paper_gain"] is None else f"{c['paper_gain']:+.2f}")
                  + f" | {c['note']} |" for c in compared]
    lines += ["", "| row | spec | note |", "|---|---|---|"]
    lines += [f"| {r['name']} | `{r['spec']}` | {r['note']} |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot_gains(info, rows, path: Path, compared=()) -> None:
    """Each row's gain over its base, then each [[compare]] entry's, with the papers'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gained = [(f"{r['name']} vs {r['base']}", r["gain"], r.get("paper_gain"))
              for r in rows if r.get("gain") and r["gain"]["mean"] is not None]
    gained += [(f"{c['row']} vs {c['base']}", c["gain"], c["paper_gain"])
               for c in compared if c["gain"]["mean"] is not None]
    longest = max((len(label) for label, _, _ in gained), default=0)
    fig, ax = plt.subplots(figsize=(max(7.0, 4 + 0.075 * longest), 0.5 * max(len(gained), 1) + 1.4))
    for y, (_, g, paper_gain) in enumerate(gained):
        err = 0 if g["std"] is None else 100 * g["std"] / math.sqrt(g["n"])
        ax.errorbar(100 * g["mean"], y, xerr=err, fmt="o", color="tab:blue",
                    label="measured (± s.e.)" if y == 0 else None)
        if paper_gain is not None:
            ax.plot(paper_gain, y, "D", color="tab:red", label="paper" if y == 0 else None)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(gained)), [label for label, _, _ in gained])
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("mIoU gain, percentage points")
    ax.set_title(f"{info['title']} — scale {info['scale']}", fontsize=9, loc="right")
    if gained:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
