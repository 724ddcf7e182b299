"""The papers' protocol in one call: k folds × seeds, test scores, mean ± std."""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import DataError
from .checkpoint import holding, load_checkpoint, write_text_atomic
from .config import RUN_OPTIONS, as_option, first_difference, shown
from .data import check_crop, load_split
from .evaluation import evaluate_checkpoint
from .jobs import run_jobs
from .tta import check_tta
from .train import TrainConfig, Trainer, TrainingError, check_model_crop, init_warning


def run_dir(out: Path, fold: int, seed: int) -> Path:
    return out / f"fold{fold}_seed{seed}"


PROGRESS_EVERY = 60.0  # seconds between two progress lines of one run


def progress_lines(label: str, trainer: Trainer, every: float = PROGRESS_EVERY):
    """Write '<label>: …' lines to stderr: now (training or resuming), then after this
    process's first epoch and at most every ``every`` seconds; returns Trainer.run's
    on_epoch callback."""
    epochs = trainer.cfg.epochs

    def say(text: str) -> None:
        sys.stderr.write(f"{label}: {text}\n")
        sys.stderr.flush()

    say(f"resuming after epoch {trainer.epoch} of {epochs}" if trainer.epoch else
        f"training {epochs} epoch(s) → {trainer.cfg.out}")
    warning = init_warning(trainer)
    if warning:
        say(warning)
    last = None

    def on_epoch(row: dict) -> None:
        nonlocal last
        if last is not None and time.monotonic() - last < every:
            return
        last = time.monotonic()
        say(f"epoch {row['epoch']}/{epochs}, loss {row['train_loss']:.4f}, val mIoU "
            f"{row['val_miou']:.4f} (best {trainer.best:.4f}), {row['seconds']:.1f} s an epoch")

    return on_epoch


def train_and_test(cfg: TrainConfig, label: str | None = None, tta: str = "none") -> dict:
    """Train one (fold, seed) run (resuming a killed one) and test its best checkpoint, with
    test-time augmentation ``tta`` (:mod:`.tta`; kept in test.json where it is not "none");
    writes test.json last, so a run with test.json is finished: such a run is only tested
    again (another ``tta``). With a ``label``, the run reports its progress on stderr
    (progress_lines)."""
    rd = Path(cfg.out)
    if not (rd / "test.json").is_file():
        trainer = Trainer(cfg, resume=(rd / "last.pt").exists())
        trainer.run(on_epoch=progress_lines(label, trainer) if label else None)
    result = evaluate_checkpoint(rd / "best.pt", split="test", device=cfg.device, tta=tta)
    if tta != "none":
        result["tta"] = tta
    write_text_atomic(rd / "test.json", json.dumps(result))
    return result


def tested_with(rd: Path) -> str | None:
    """The test-time augmentation of a finished run's test.json ("none" before there was
    one); None for a run without test.json."""
    try:
        return json.loads((rd / "test.json").read_text()).get("tta", "none")
    except (OSError, ValueError):
        return None


def stored_config(rd: Path) -> tuple[dict, bool] | None:
    """(configuration, finished) of the run kept in ``rd``: a finished run's config.json, an
    unfinished run's last.pt; None where there is none or it cannot be read (the run itself
    then reports why)."""
    try:
        if (rd / "test.json").is_file():
            return json.loads((rd / "config.json").read_text()), True
        if (rd / "last.pt").is_file():
            return load_checkpoint(rd / "last.pt")["config"], False
    except (OSError, ValueError, KeyError):
        pass
    return None


def check_runs_can_start(configs: list[tuple[TrainConfig, str]]) -> None:
    """Fail once, before anything is written, on what every run of a configuration would fail
    on: bad data or folds (:func:`load_split`), a crop larger than the data's images or one
    the spec's model does not take. ``(cfg, where)`` pairs; ``where`` ("row 'U-Net'", or ""
    for one spec) starts the crop's message."""
    from ..registry import create_model

    data = {}
    for cfg, where in configs:
        key = (cfg.data, cfg.classes, cfg.class_map, cfg.folds, cfg.fold)
        if key not in data:
            data[key] = load_split(cfg)[0]
        sources = data[key]
        try:
            check_crop(sources, list(range(len(sources.images))), cfg.crop)
            check_model_crop(create_model(cfg.spec, in_channels=sources.in_channels,
                                          classes=len(sources.class_names)), cfg.crop)
        except DataError as e:  # ConfigError too: the CLI names it as the option
            if not where:
                raise
            raise DataError(f"{where}: {e}") from None


def check_kept_runs(planned: list[tuple[TrainConfig, str]], setting=as_option) -> None:
    """Refuse, before anything trains, settings that differ from a run already in its folder
    (DataError naming the setting as ``setting(name, value)`` writes it, the run and the
    run's value). A finished run is kept as it is, so it must match in spec, RUN_OPTIONS and
    epochs: a summary must not average runs of other settings. An unfinished run resumes,
    so it must match in spec and RUN_OPTIONS (its epochs may change, as with ``train
    --resume``)."""
    for cfg, label in planned:
        kept = stored_config(Path(cfg.out))
        if kept is None:
            continue
        saved, finished = kept
        names = ("spec", *RUN_OPTIONS, *(("epochs",) if finished else ()))
        differs = first_difference(cfg, saved, names)
        if differs:
            state = "finished" if finished else "unfinished"
            ours = cfg.spec if differs == "spec" else getattr(cfg, differs)
            raise DataError(f"{setting(differs, shown(ours))}: {label} in "
                            f"{cfg.out!r} ({state}) was trained with {shown(saved[differs])}; "
                            "give that value to keep its runs, or use another --out")


def run_cv(base: TrainConfig, folds: int, seeds: int, out: Path, on_run=None, jobs: int = 1,
           threads: int | None = None, tta: str = "none") -> dict:
    """Train and test every (fold, seed), ``jobs`` runs at a time; finished runs (with
    test.json) are kept. A killed run resumes from its last.pt. ``tta``: test with that
    test-time augmentation (:mod:`.tta`); finished runs tested with another are tested again,
    not trained again.

    Returns the summary (also written to out/summary.csv and out/summary.md). A run that
    fails is reported with its (fold, seed) and error after the others have finished
    (TrainingError); the summary then covers the finished runs.
    """
    if seeds < 1:
        raise DataError(f"--seeds {seeds}: must be ≥ 1")
    check_tta(tta)
    base.folds = folds
    base.check()
    check_runs_can_start([(replace(base, fold=0, seed=0), "")])  # data, --folds, --crop
    planned = [(replace(base, fold=f, folds=folds, seed=s, out=str(run_dir(out, f, s))),
                f"fold {f} seed {s}") for f in range(folds) for s in range(seeds)]
    check_kept_runs(planned)
    with holding(out):  # a second cv into this folder: refused before it trains anything
        pending = [(cfg, label, tta) for cfg, label in planned
                   if tested_with(Path(cfg.out)) != tta]
        failed = []
        for (cfg, _, _), ok, value in run_jobs(train_and_test, pending, jobs, threads):
            if not ok:
                failed.append(f"fold {cfg.fold} seed {cfg.seed}: {value}")
            elif on_run:
                on_run({"fold": cfg.fold, "seed": cfg.seed, **value})
        results = [{"fold": f, "seed": s,
                    **json.loads((run_dir(out, f, s) / "test.json").read_text())}
                   for f in range(folds) for s in range(seeds)
                   if (run_dir(out, f, s) / "test.json").exists()]
        summary = summarise(results) if results else None
        if summary:
            write_summary(summary, results, out)
    if failed:
        raise TrainingError(f"{len(failed)} of {folds * seeds} runs failed: " + "; ".join(failed))
    return summary


def summarise(results: list[dict]) -> dict:
    """Mean and (sample) std over runs of each class IoU and mIoU."""
    names = list(results[0]["iou"])
    rows = {name: [r["iou"][name] for r in results if r["iou"][name] is not None] for name in names}
    rows["mIoU"] = [r["miou"] for r in results]

    def stats(v):
        return {"mean": statistics.mean(v) if v else None,
                "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}

    return {"spec": results[0]["spec"], "runs": len(results),
            "tta": results[0].get("tta", "none"),
            "classes": {k: stats(v) for k, v in rows.items()}}


def write_summary(summary: dict, results: list[dict], out: Path) -> None:
    """out/summary.csv and out/summary.md, each written atomically."""
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["class", "mean_iou", "std_iou", "runs"])
    for name, s in summary["classes"].items():
        w.writerow([name, s["mean"], s["std"], s["n"]])
    write_text_atomic(out / "summary.csv", table.getvalue())
    augmented = "" if summary["tta"] == "none" else f", test-time augmentation {summary['tta']}"
    lines = [f"# {summary['spec']}: {summary['runs']} runs (folds × seeds), test IoU %"
             f"{augmented}", "",
             "| class | mean ± std |", "|---|---|"]
    for name, s in summary["classes"].items():
        value = "n/a" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
        lines.append(f"| {name} | {value} |")
    lines += ["", "| fold | seed | mIoU |", "|---|---|---|"]
    lines += [f"| {r['fold']} | {r['seed']} | {100 * r['miou']:.2f} |" for r in results]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
