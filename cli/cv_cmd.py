"""``cellseg cv``: k folds × seeds with test scores as mean ± std (the papers' protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rich.console import Console
from rich.table import Table

from ..engine.config import TrainConfig
from . import options as o


@o.with_train_options(skip=("fold", "folds", "seed"))
def cv_command(
    spec: o.Spec,
    cfg: TrainConfig,
    folds: Annotated[int, typer.Option(help="number of folds (split by source image)")] = 5,
    seeds: Annotated[int, typer.Option(help="seeds per fold (0, 1, ...)")] = 3,
    jobs: Annotated[int, typer.Option(help="runs at a time, each in its own process")] = 1,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads per run (default: the cores split between the jobs)")] = None,
    tta: Annotated[str, typer.Option(
        help="test with test-time augmentation: none, flips or d4 (as eval --tta); finished "
             "runs tested otherwise are tested again, not trained again")] = "none",
    out: o.Out = "runs/cv",
) -> None:
    """Train and test every fold × seed (finished runs are skipped); write summary.csv/.md."""
    from ..engine.cv import run_cv
    from ..engine.train import emulation_note

    o.check_jobs(jobs, threads)
    console = Console(stderr=True)
    note = emulation_note(cfg.device, cfg.precision)
    if note:
        console.print(note)
    summary = run_cv(cfg, folds, seeds, Path(out), jobs=jobs, threads=threads, tta=tta,
                     on_run=lambda r: console.print(
                         f"fold {r['fold']} seed {r['seed']}: test mIoU {r['miou']:.4f}"))
    augmented = "" if tta == "none" else f", test-time augmentation {tta}"
    table = Table(title=f"{summary['spec']} — {summary['runs']} runs, test IoU (mean ± std)"
                        f"{augmented}")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, s in summary["classes"].items():
        table.add_row(name, "n/a" if s["mean"] is None else
                      f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
    Console().print(table)
    console.print(f"wrote {Path(out) / 'summary.csv'} and {Path(out) / 'summary.md'}")
