"""``cellseg train | eval | predict``: thin wrappers over the engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..engine.config import TrainConfig
from . import options as o

console = Console(stderr=True)


@o.with_train_options()
def train_command(
    spec: o.Spec,
    cfg: TrainConfig,
    out: o.Out = "runs/latest",
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
) -> None:
    """Train SPEC; writes best.pt, last.pt, metrics.csv, curves.png, config.json into --out."""
    from ..engine import distributed
    from ..engine.train import Trainer

    trainer = Trainer(cfg, resume=resume)
    try:
        if distributed.is_main():
            _train_with_progress(trainer, cfg)
        else:
            trainer.run()
    finally:
        distributed.teardown()


def _train_with_progress(trainer, cfg: TrainConfig) -> None:
    from ..engine import distributed

    console.print(f"[bold]{cfg.spec}[/] on {cfg.data} fold {cfg.fold}/{cfg.folds}: "
                  f"{len(trainer.train_set)} train / {len(trainer.val_set)} val crops, "
                  f"device {trainer.device}, {distributed.world_size()} process(es)")
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=trainer.epoch,
                                        info="")
        steps_task = progress.add_task("steps", total=None, info="")

        shown = [0.0]

        def on_step(i, n, loss):  # reading the loss waits for the device: twice a second
            if time.monotonic() - shown[0] > 0.5 or i == n:
                shown[0] = time.monotonic()
                progress.update(steps_task, completed=i, total=n, info=f"loss {float(loss):.4f}")

        def on_epoch(row):
            progress.update(epochs_task, advance=1,
                            info=f"val mIoU {row['val_miou']:.4f} (best {trainer.best:.4f})")

        trainer.run(on_step, on_epoch)
    console.print(f"best validation mIoU {trainer.best:.4f}; wrote {Path(cfg.out) / 'best.pt'}")


def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="a best.pt / last.pt")],
    data: Annotated[str | None, typer.Option(help="default: the checkpoint's training data")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    round: Annotated[int | None, typer.Option(
        help="two-round models: evaluate round 1 or 2 (default: the spec's)")] = None,
    classes: Annotated[str | None, typer.Option(
        help="sstem class map (must match training for the training data)")] = None,
    class_map: Annotated[str | None, typer.Option(
        help="mask grey levels, e.g. '0:bg,255:cell' (for other data: map its masks)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Per-class IoU, mIoU and pixel accuracy over all pixels of a split."""
    from ..engine.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, split, device, round, classes, class_map)
    crops, spec = result.pop("crops"), result.pop("spec")
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{spec} — {split} split ({crops} crops)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in result["iou"].items():
        table.add_row(name, "n/a" if value is None else f"{value:.4f}")
    table.add_row("[bold]mIoU[/]", f"[bold]{result['miou']:.4f}[/]")
    table.add_row("pixel accuracy", f"{result['pixel_accuracy']:.4f}")
    Console().print(table)


def predict_command(
    checkpoint: Annotated[str, typer.Argument(
        help="a best.pt / last.pt, an exported .onnx or a BioImage Model Zoo .zip")],
    inputs: Annotated[list[str], typer.Argument(help="images, folders or TIFF stacks")],
    out: Annotated[str, typer.Option(help="output folder")] = "predictions",
    tile: Annotated[int, typer.Option(help="tile size")] = 256,
    overlap: Annotated[int, typer.Option(help="tile overlap in pixels")] = 32,
    overlay: Annotated[bool, typer.Option(help="also write colour overlay PNGs")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    runtime: Annotated[str, typer.Option(help="torch, or onnx (ONNX Runtime on the CPU)")
                       ] = "torch",
) -> None:
    """Label TIFFs (one per input, named after it) for images of any size."""
    from ..engine.train import resolve_device
    from ..engine.predict import predict_paths

    dev = resolve_device(device) if runtime == "torch" else "cpu"
    predict_paths(checkpoint, inputs, out, tile, overlap, overlay, dev, runtime,
                  on_image=lambda path, target, labels: console.print(
                      f"{path} → {target} ({labels[0].shape[0]}×{labels[0].shape[1]}, "
                      f"{len(labels)} page(s))"))
