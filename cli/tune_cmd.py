"""``cellseg tune``: TPE search of plugin and training parameters (Optuna)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..engine.config import TrainConfig
from ..errors import TrainingError
from . import options as o


def train_command(spec: str, cfg: TrainConfig, given: set[str], params: dict) -> str:
    """The ``cellseg train`` command of a trial: its spec, the training options the tune
    command was given (a preset's values spelt out) and the trial's ``train.*`` values."""
    values = {name: getattr(cfg, name) for name in sorted(given - {"preset"})}
    values.update({k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("train.")})
    words = ["cellseg", "train", f'"{spec}"' if '"' not in spec else shlex.quote(spec)]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


@o.with_train_options()
def tune_command(
    spec: o.Spec,
    cfg: TrainConfig,
    given: set[str],
    search: Annotated[list[str], typer.Option(
        help="PARAM=SPACE, e.g. frem.B=int:1:512, frem.X=float:1:1000:log, "
             "train.lr=float:1e-4:1e-2:log, train.optimizer=choice:adam,sgd (repeatable)")],
    trials: Annotated[int, typer.Option(help="total trials of the study (re-runs resume)")] = 50,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (default sqlite:///OUT/study.db)")] = None,
    prune: Annotated[bool, typer.Option(
        help="stop hopeless trials (median pruner on per-epoch validation mIoU)")] = False,
    jobs: Annotated[int, typer.Option(
        help="trials at a time, each job a process on the shared study")] = 1,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads per job (default: the cores split between the jobs)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    out: o.Out = "runs/tune",
) -> None:
    """Search parameters by validation mIoU (seeded TPE); print the best trial's train command."""
    from ..engine.tune import run_study, summary, trial_line

    o.check_jobs(jobs, threads)
    console = Console(stderr=True)
    study = run_study(spec, search, trials, cfg, Path(out), storage, prune,
                      on_trial=lambda s, t: console.print(trial_line(t), markup=False),
                      jobs=jobs, threads=threads)
    result = summary(study)
    if result["best_spec"] is not None:
        result["best_command"] = train_command(result["best_spec"], cfg, given,
                                               result["best_params"])
    if as_json:
        print(json.dumps(result))
        no_trial_finished(study)
        return
    table = Table(title=f"{len(study.trials)} trials")
    for col in ("trial", "state", "params", "val mIoU"):
        table.add_column(col)
    for t in study.trials:
        table.add_row(str(t.number), t.state.name.lower(), json.dumps(t.params),
                      "" if t.value is None else f"{t.value:.4f}")
    Console().print(table)
    Console().print(f"best: {result['best_value']}")
    if "best_command" in result:
        print(result["best_command"])  # plain: the command is to be copied whole
    console.print(f"wrote {Path(out) / 'search.png'}")
    no_trial_finished(study)


def no_trial_finished(study) -> None:
    """TrainingError (exit 2) where every trial failed: the last one's reason, in one line."""
    if any(t.value is not None for t in study.trials):
        return
    errors = [t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs]
    raise TrainingError(f"no trial finished ({len(study.trials)} failed)"
                        + (f"; the last: {errors[-1]}" if errors else ""))
