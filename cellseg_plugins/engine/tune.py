"""Hyper-parameter search with Optuna's TPE sampler, as the FREM paper chose B and X.

A search space names ``plugin.param`` (or ``train.<option>``) and a distribution:
``int:LOW:HIGH[:log]``, ``float:LOW:HIGH[:log]`` or ``choice:a,b,c``. The objective is the best
validation mIoU of one training run by the engine; the study lives in a database (SQLite by
default), so a re-run resumes and several processes can share it: ``jobs`` > 1 runs that many
processes on one study, each sampling with its own seed.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from ..errors import ConfigError
from ..registry import SpecError, get_entry, parse_spec
from ..registry.spec import Spec, Term
from .checkpoint import write_text_atomic
from .config import RUN_OPTIONS, as_option, check_field, first_difference, option_fields, shown
from .cv import check_runs_can_start
from .data import DataError, load_split
from .jobs import run_jobs
from .train import TrainConfig, Trainer, TrainingError

TRAIN_PARAMS = {"lr": float, "batch_size": int, "epochs": int, "optimizer": str,
                "schedule": str, "loss": str, "class_weights": str, "crop": int}


@dataclass(frozen=True)
class SearchSpace:
    target: str  # plugin/arch name, or "train"
    param: str
    kind: str  # int | float | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    @property
    def key(self) -> str:
        return f"{self.target}.{self.param}"

    def suggest(self, trial):
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_search(text: str, spec: Spec) -> SearchSpace:
    """'frem.B=int:1:512' → SearchSpace, checked against the spec and the registry."""
    name, sep, space = text.partition("=")
    target, dot, param = name.strip().partition(".")
    if not sep or not dot or not param:
        raise DataError(f"--search {text!r}: expected PARAM=SPACE, e.g. frem.B=int:1:512")
    target = target.lower()
    if target == "train":
        if param not in TRAIN_PARAMS:
            raise DataError(f"--search {text!r}: unknown training option {param!r} "
                            f"(searchable: {', '.join(TRAIN_PARAMS)})")
        annotation = dict((n, a) for n, a, _ in option_fields())[param]
        check = partial(check_field, param, annotation)
    else:
        entry = get_entry(target)
        if entry is None:
            raise DataError(f"--search {text!r}: unknown plugin or arch {target!r}")
        if target not in [t.name for t in spec.terms]:
            raise DataError(f"--search {text!r}: {target!r} is not in the spec {str(spec)!r}")
        p = entry.param(param)
        if p is None:
            raise DataError(f"--search {text!r}: {target!r} has no parameter {param!r} "
                            f"(valid: {', '.join(q.name for q in entry.params)})")
        param, check = p.name, p.check
        if p.choices is not None and not space.strip().startswith("choice:"):
            raise DataError(f"--search {text!r}: {param} takes one of "
                            f"{', '.join(map(repr, p.choices))}: search it as choice:a,b,…")
    kind, _, rest = space.strip().partition(":")
    if kind == "choice":
        choices = tuple(_literal(c.strip()) for c in rest.split(",") if c.strip())
        if not choices:
            raise DataError(f"--search {text!r}: choice needs values, e.g. choice:a,b,c")
        for value in choices:
            _check_value(text, param, value, check)
        return SearchSpace(target, param, "choice", choices=choices)
    if kind not in ("int", "float"):
        raise DataError(f"--search {text!r}: space {space!r} must be int:LOW:HIGH[:log], "
                        "float:LOW:HIGH[:log] or choice:a,b,c")
    parts = rest.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise DataError(f"--search {text!r}: expected {kind}:LOW:HIGH or {kind}:LOW:HIGH:log")
    try:
        low, high = (int(parts[0]), int(parts[1])) if kind == "int" else (
            float(parts[0]), float(parts[1]))
    except ValueError:
        raise DataError(f"--search {text!r}: LOW and HIGH must be {kind} numbers") from None
    log = len(parts) == 3
    if low > high:
        raise DataError(f"--search {text!r}: LOW {low} is greater than HIGH {high}")
    if log and low <= 0:
        raise DataError(f"--search {text!r}: a log scale needs LOW > 0, got {low}")
    for value in (low, high):  # the parameters' ranges are intervals: the ends decide
        _check_value(text, param, value, check)
    return SearchSpace(target, param, kind, low, high, log)


def _check_value(text: str, param: str, value, check) -> None:
    """DataError naming the search and the value where ``check`` (the parameter's or the
    training option's own validation) refuses a value the space could draw."""
    try:
        check(value)
    except ConfigError as e:
        raise DataError(f"--search {text!r}: {param}={value!r}: {e.reason}") from None
    except ValueError as e:
        raise DataError(f"--search {text!r}: {param}={value!r}: {e}") from None


def apply_params(spec: Spec, cfg: TrainConfig, values: dict[str, object]) -> tuple[str, TrainConfig]:
    """The spec string and config with ``{"frem.B": 8, "train.lr": 1e-3}`` set (validated)."""
    terms = []
    for term in spec.terms:
        kwargs = term.kwargs
        for key, value in values.items():
            target, param = key.split(".", 1)
            if target == term.name:
                kwargs[param] = value
        terms.append(Term(term.name, tuple(kwargs.items())))
    text = "+".join(str(t) for t in terms)
    train = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("train.")}
    return str(parse_spec(text)), replace(cfg, spec=text, **train)


def study_name(spec: str, spaces: list[SearchSpace], cfg: TrainConfig) -> str:
    key = json.dumps([spec, [s.__dict__ for s in spaces], cfg.data, cfg.fold, cfg.folds,
                      cfg.epochs], sort_keys=True, default=str)
    return "cellseg-" + hashlib.sha1(key.encode()).hexdigest()[:12]


def open_storage(url: str):
    """An Optuna RDB storage; retries while another process is creating the same database."""
    import random
    import time

    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:  # sqlalchemy errors while two processes create the schema
            if "sqlalchemy" not in type(e).__module__ or attempt == 5:
                raise DataError(f"--storage {url!r}: {' '.join(str(e).split())[:200]}") from None
            time.sleep(0.2 + random.random())


def claim_folder(out: Path, name: str, searches: list[str], spaces: list[SearchSpace],
                 cfg: TrainConfig) -> None:
    """Record in ``out``/tune.json which study's trials the folder holds (its spec, searches,
    RUN_OPTIONS and epochs), or refuse, in one line naming the setting, to continue a
    recorded study with others: its trials would mix settings (another lr) or collide with
    another study's trial folders (another spec, search or epochs)."""
    record = out / "tune.json"
    ours = {"study": name, "search": searches, "spaces": [asdict(s) for s in spaces],
            **{n: getattr(cfg, n) for n in ("spec", *RUN_OPTIONS, "epochs")}}
    if record.is_file():
        kept = json.loads(record.read_text())
        if json.dumps(kept["spaces"], default=str) != json.dumps(ours["spaces"], default=str):
            raise DataError(f"--search {' '.join(searches)}: the tune study in {str(out)!r} "
                            f"searched {' '.join(kept['search'])}; give those searches to "
                            "continue it, or use another --out")
        differs = first_difference(cfg, kept, ("spec", *RUN_OPTIONS, "epochs"))
        if differs:
            ours_value = cfg.spec if differs == "spec" else getattr(cfg, differs)
            raise DataError(f"{as_option(differs, shown(ours_value))}: the tune study in "
                            f"{str(out)!r} ran its trials with {shown(kept[differs])}; give "
                            "that value to continue it, or use another --out")
        if kept["study"] != name:  # recorded under another study name: trial folders collide
            raise DataError(f"--out {str(out)!r} holds the trials of another tune study; use "
                            "another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(ours, indent=2, default=str))


def run_study(spec_text: str, searches: list[str], trials: int, cfg: TrainConfig, out: Path,
              storage: str | None = None, prune: bool = False, on_trial=None, jobs: int = 1,
              threads: int | None = None):
    """Run the study until it has ``trials`` finished trials, ``jobs`` trials at a time (each
    job a process with ``threads`` CPU threads, reporting its trials on stderr); returns the
    optuna Study. ``on_trial(study, trial)`` is called as this process's trials finish."""
    import optuna

    spec = parse_spec(spec_text)
    spaces = [parse_search(s, spec) for s in searches]
    if not spaces:
        raise DataError("give at least one --search PARAM=SPACE")
    if len({s.key for s in spaces}) != len(spaces):
        raise DataError("a parameter is searched twice")
    if trials < 1:
        raise DataError(f"--trials {trials}: must be ≥ 1")
    cfg.spec = str(spec)
    cfg.check()
    if "train.crop" in {s.key for s in spaces}:
        load_split(cfg)  # bad data or --fold/--folds fail here, first; each trial its crop
    else:
        check_runs_can_start([(cfg, "")])  # bad data, --fold/--folds or --crop, first
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    opened = open_storage(storage)  # a bad URL fails here, before anything is written
    name = study_name(str(spec), spaces, cfg)
    claim_folder(out, name, searches, spaces, cfg)
    study = optuna.create_study(study_name=name, storage=opened, direction="maximize",
                                load_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(states=finished))
    # a fresh seed per resumption and per job, so that resumed or parallel runs do not
    # repeat samples
    seed = cfg.seed + len(study.trials)
    if remaining > 0 and jobs == 1:
        optimize(storage, name, searches, cfg, out, prune, seed, remaining, trials, threads,
                 on_trial)
    elif remaining > 0:
        shares = [remaining // jobs + (i < remaining % jobs) for i in range(min(jobs, remaining))]
        calls = [(storage, name, searches, cfg, out, prune, seed + 1000 * i, n, trials)
                 for i, n in enumerate(shares)]
        failed = [value for _, ok, value in run_jobs(optimize, calls, len(calls), threads)
                  if not ok]
        if failed:
            raise TrainingError(f"{len(failed)} of {len(calls)} tune jobs failed: "
                                + "; ".join(failed))
    study = optuna.load_study(study_name=name, storage=opened)
    plot_search(study, spaces, out / "search.png")
    return study


def trial_line(trial) -> str:
    """'trial 3: complete {'frem.B': 8} → 0.61' (a finished trial, as tune reports it), or
    'trial 4: fail {'frem.B': 900}: <why the model refused it>'."""
    if "error" in trial.user_attrs:
        return f"trial {trial.number}: {trial.state.name.lower()} {trial.params}: " \
               f"{trial.user_attrs['error']}"
    return f"trial {trial.number}: {trial.state.name.lower()} {trial.params} → {trial.value}"


def _say_trial(study, trial) -> None:
    import sys

    sys.stderr.write(trial_line(trial) + "\n")
    sys.stderr.flush()


def optimize(storage: str, name: str, searches: list[str], cfg: TrainConfig, out: Path,
             prune: bool, seed: int, n_trials: int, total: int, threads: int | None = None,
             on_trial=_say_trial) -> None:
    """Run ``n_trials`` trials of the stored study ``name`` (TPE sampler seeded with ``seed``),
    each one training run of the engine, in this process; stop early once the study (with
    the trials of other processes) has ``total`` finished trials."""
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials: trial_line, no traceback
    spec = parse_spec(cfg.spec)
    spaces = [parse_search(s, spec) for s in searches]
    study = optuna.load_study(study_name=name, storage=open_storage(storage),
                              sampler=optuna.samplers.TPESampler(seed=seed),
                              pruner=optuna.pruners.MedianPruner() if prune else
                              optuna.pruners.NopPruner())

    def train(trial):
        values = {s.key: s.suggest(trial) for s in spaces}
        trial_spec, trial_cfg = apply_params(spec, cfg, values)
        trial_cfg = replace(trial_cfg, spec=trial_spec, out=str(out / f"trial{trial.number:04d}"))
        trial.set_user_attr("spec", trial_spec)
        trainer = Trainer(trial_cfg)

        def report(row):
            trial.report(row["val_miou"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        trainer.run(on_epoch=report)
        return trainer.best

    def objective(trial):
        try:
            return train(trial)
        except (SpecError, DataError) as e:  # values the model or data refuse (a crop);
            # kept for trial_line: Optuna's own note is a traceback
            trial.set_user_attr("error", str(e))
            raise

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # a sampled value the model or data reject (B above the bottleneck's channels, a
        # crop the model does not take) fails that trial only
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        study.optimize(objective, n_trials=n_trials, catch=(SpecError, DataError), callbacks=[
            optuna.study.MaxTrialsCallback(total, states=finished)] + ([on_trial] if on_trial
                                                                        else []))
    finally:
        torch.set_num_threads(previous)


def summary(study) -> dict:
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return {"n_trials": len(study.trials), "best_value": None, "best_params": {},
                "best_spec": None}
    best = study.best_trial
    return {"n_trials": len(study.trials), "best_value": best.value, "best_params": best.params,
            "best_spec": best.user_attrs.get("spec")}


def plot_search(study, spaces: list[SearchSpace], path: Path) -> None:
    """Sampled parameters coloured by validation mIoU (the FREM paper's Fig. 7–8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(5, 4))
    if done:
        values = [t.value for t in done]
        x = [t.params[spaces[0].key] for t in done]
        if len(spaces) > 1:
            y = [t.params[spaces[1].key] for t in done]
            ax.set_ylabel(spaces[1].key)
            if spaces[1].log:
                ax.set_yscale("log")
        else:
            y = values
            ax.set_ylabel("validation mIoU")
        points = ax.scatter(x, y, c=values, cmap="viridis")
        fig.colorbar(points, label="validation mIoU")
        if spaces[0].log:
            ax.set_xscale("log")
    ax.set_xlabel(spaces[0].key)
    ax.set_title(f"{len(done)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
