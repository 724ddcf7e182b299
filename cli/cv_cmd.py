"""``cellseg cv``: k folds × seeds with test scores as mean ± std (the papers' protocol)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..engine.cv import run_cv
from ..engine.train import TrainConfig
from . import options as o
from .errors import reports_errors


@reports_errors
def cv_command(
    spec: o.Spec,
    data: o.Data = "synthetic",
    classes: o.Classes = None,
    class_map: o.ClassMap = None,
    folds: o.Folds = 5,
    seeds: o.Seeds = 3,
    epochs: o.Epochs = 20,
    batch_size: o.BatchSize = 8,
    lr: o.Lr = 1e-3,
    optimizer: o.Optimizer = "adam",
    schedule: o.Schedule = "none",
    loss: o.Loss = "ce",
    class_weights: o.ClassWeights = "none",
    device: o.Device = "auto",
    amp: o.Amp = False,
    crop: o.Crop = 256,
    augment: o.Augment = True,
    workers: o.Workers = 0,
    out: o.Out = "runs/cv",
) -> None:
    """Train and test every fold × seed (finished runs are skipped); write summary.csv/.md."""
    options = dict(locals())
    n_folds, n_seeds = options.pop("folds"), options.pop("seeds")
    base = TrainConfig(**options, folds=n_folds)
    base.check()
    console = Console(stderr=True)
    summary = run_cv(base, n_folds, n_seeds, Path(out), on_run=lambda r: console.print(
        f"fold {r['fold']} seed {r['seed']}: test mIoU {r['miou']:.4f}"))
    table = Table(title=f"{summary['spec']} — {summary['runs']} runs, test IoU (mean ± std)")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, s in summary["classes"].items():
        table.add_row(name, "n/a" if s["mean"] is None else
                      f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
    Console().print(table)
    console.print(f"wrote {Path(out) / 'summary.csv'} and {Path(out) / 'summary.md'}")
