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

from ..engine import distributed
from ..engine.checkpoint import load_checkpoint, model_from_checkpoint
from ..engine.evaluation import evaluate_checkpoint
from ..engine.train import TrainConfig, Trainer, resolve_device
from . import options as o
from .errors import CLIError, reports_errors

console = Console(stderr=True)


@reports_errors
@o.with_train_options()
def train_command(
    spec: o.Spec,
    cfg: TrainConfig,
    out: o.Out = "runs/latest",
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
) -> None:
    """Train SPEC; writes best.pt, last.pt, metrics.csv, curves.png, config.json into --out."""
    trainer = Trainer(cfg, resume=resume)
    try:
        if distributed.is_main():
            _train_with_progress(trainer, cfg)
        else:
            trainer.run()
    finally:
        distributed.teardown()


def _train_with_progress(trainer: Trainer, cfg: TrainConfig) -> None:
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


@reports_errors
def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="a best.pt / last.pt")],
    data: Annotated[str | None, typer.Option(help="default: the checkpoint's training data")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    round: Annotated[int | None, typer.Option(
        help="two-round models: evaluate round 1 or 2 (default: the spec's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Per-class IoU, mIoU and pixel accuracy over all pixels of a split."""
    result = evaluate_checkpoint(checkpoint, data, split, device, round)
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


@reports_errors
def predict_command(
    checkpoint: Annotated[str, typer.Argument(help="a best.pt / last.pt")],
    inputs: Annotated[list[str], typer.Argument(help="images, folders or TIFF stacks")],
    out: Annotated[str, typer.Option(help="output folder")] = "predictions",
    tile: Annotated[int, typer.Option(help="tile size")] = 256,
    overlap: Annotated[int, typer.Option(help="tile overlap in pixels")] = 32,
    overlay: Annotated[bool, typer.Option(help="also write colour overlay PNGs")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Label TIFFs (one per input, named after it) for images of any size."""

    from PIL import Image

    from ..engine.predict import iter_inputs, overlay as make_overlay, predict_image, write_labels

    if tile < 32:
        raise CLIError(f"--tile {tile}: must be at least 32")
    if not 0 <= overlap < tile:
        raise CLIError(f"--overlap {overlap}: must be in [0, tile)")
    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    items = list(iter_inputs(inputs))
    for path, pages, _ in items:  # check every input before writing anything
        channels = 1 if pages[0].ndim == 2 else pages[0].shape[-1]
        if channels != ckpt["in_channels"]:
            raise CLIError(f"{path}: {channels} channel(s), the model expects {ckpt['in_channels']}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm = ckpt["norm"]
    for path, pages, _ in items:
        labels = [predict_image(model, p, norm["mean"], norm["std"], tile, overlap, device=dev)
                  for p in pages]
        write_labels(out_dir / f"{path.stem}.tif", labels)
        if overlay:
            for k, (p, lab) in enumerate(zip(pages, labels)):
                suffix = f"_{k}" if len(pages) > 1 else ""
                Image.fromarray(make_overlay(p, lab)).save(out_dir / f"{path.stem}{suffix}_overlay.png")
        console.print(f"{path} → {out_dir / (path.stem + '.tif')} "
                      f"({labels[0].shape[0]}×{labels[0].shape[1]}, {len(labels)} page(s))")

