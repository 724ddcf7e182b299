"""``cellseg train | eval | predict``: thin wrappers over the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..engine.checkpoint import load_checkpoint, model_from_checkpoint
from ..engine.data import CropDataset, DataError, load_data
from ..engine.metrics import scores
from ..engine.train import TrainConfig, Trainer, TrainingError, evaluate, resolve_device
from .errors import CLIError, reports_errors

console = Console(stderr=True)


@reports_errors
def train_command(
    spec: Annotated[str, typer.Argument(help="model spec, e.g. 'unet+lfa(m=7)'")],
    data: Annotated[str, typer.Option(help="synthetic (built in), sstem, or a folder")] = "synthetic",
    classes: Annotated[str | None, typer.Option(help="sstem class map: sstem5 or sstem4")] = None,
    class_map: Annotated[str | None, typer.Option(help="mask grey levels, e.g. '0:bg,255:cell'")] = None,
    epochs: Annotated[int, typer.Option()] = 20,
    batch_size: Annotated[int, typer.Option()] = 8,
    lr: Annotated[float, typer.Option()] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd")] = "adam",
    schedule: Annotated[str, typer.Option(help="none or cosine")] = "none",
    loss: Annotated[str, typer.Option(help="ce, focal+iou or dice+ce")] = "ce",
    class_weights: Annotated[str, typer.Option(help="none or auto (median frequency)")] = "none",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    amp: Annotated[bool, typer.Option(help="mixed precision")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    fold: Annotated[int, typer.Option(help="test fold index")] = 0,
    folds: Annotated[int, typer.Option(help="number of folds (split by source image)")] = 5,
    crop: Annotated[int, typer.Option(help="non-overlapping crop size")] = 256,
    augment: Annotated[bool, typer.Option(help="random 90° rotations and flips")] = True,
    workers: Annotated[int, typer.Option(help="data-loader worker processes")] = 0,
    out: Annotated[str, typer.Option(help="run folder")] = "runs/latest",
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
) -> None:
    """Train SPEC; writes best.pt, last.pt, metrics.csv, curves.png, config.json into --out."""
    cfg = TrainConfig(spec=spec, data=data, classes=classes, class_map=class_map, epochs=epochs,
                      batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
                      loss=loss, class_weights=class_weights, device=device, amp=amp, seed=seed,
                      fold=fold, folds=folds, crop=crop, augment=augment, workers=workers, out=out)
    try:
        trainer = Trainer(cfg, resume=resume)
    except DataError as e:
        raise CLIError(str(e)) from None
    console.print(f"[bold]{cfg.spec}[/] on {cfg.data} fold {cfg.fold}/{cfg.folds}: "
                  f"{len(trainer.train_set)} train / {len(trainer.val_set)} val crops, "
                  f"device {trainer.device}")
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=trainer.epoch,
                                        info="")
        steps_task = progress.add_task("steps", total=None, info="")

        def on_step(i, n, value):
            progress.update(steps_task, completed=i, total=n, info=f"loss {value:.4f}")

        def on_epoch(row):
            progress.update(epochs_task, advance=1,
                            info=f"val mIoU {row['val_miou']:.4f} (best {trainer.best:.4f})")

        try:
            trainer.run(on_step, on_epoch)
        except TrainingError as e:
            raise CLIError(str(e)) from None
    console.print(f"best validation mIoU {trainer.best:.4f}; wrote {Path(out) / 'best.pt'}")


@reports_errors
def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="a best.pt / last.pt")],
    data: Annotated[str | None, typer.Option(help="default: the checkpoint's training data")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Per-class IoU, mIoU and pixel accuracy over all pixels of a split."""
    if split not in ("test", "val"):
        raise CLIError(f"--split {split!r}: expected test or val")
    try:
        ckpt = load_checkpoint(checkpoint)
        cfg = ckpt["config"]
        sources = load_data(data or cfg["data"], cfg["classes"], cfg["class_map"], cfg["seed"])
        if list(sources.class_names) != ckpt["class_names"]:
            raise DataError(f"data classes {list(sources.class_names)} differ from the "
                            f"checkpoint's {ckpt['class_names']}")
        indices = ckpt["split"][split] if data in (None, cfg["data"]) else list(
            range(len(sources.images)))
        dataset = CropDataset(sources, indices, cfg["crop"], ckpt["norm"]["mean"], ckpt["norm"]["std"])
        dev = resolve_device(device)
        model = model_from_checkpoint(ckpt).to(dev)
    except DataError as e:
        raise CLIError(str(e)) from None
    loader = __import__("torch").utils.data.DataLoader(dataset, batch_size=8)
    result = scores(evaluate(model, loader, len(ckpt["class_names"]), dev), ckpt["class_names"])
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{ckpt['spec']} — {split} split ({len(dataset)} crops)")
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
    try:
        ckpt = load_checkpoint(checkpoint)
        dev = resolve_device(device)
        model = model_from_checkpoint(ckpt).to(dev)
        items = list(iter_inputs(inputs))
    except DataError as e:
        raise CLIError(str(e)) from None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm = ckpt["norm"]
    for path, pages, _ in items:
        channels = 1 if pages[0].ndim == 2 else pages[0].shape[-1]
        if channels != ckpt["in_channels"]:
            raise CLIError(f"{path}: {channels} channel(s), the model expects {ckpt['in_channels']}")
        labels = [predict_image(model, p, norm["mean"], norm["std"], tile, overlap, device=dev)
                  for p in pages]
        write_labels(out_dir / f"{path.stem}.tif", labels)
        if overlay:
            for k, (p, lab) in enumerate(zip(pages, labels)):
                suffix = f"_{k}" if len(pages) > 1 else ""
                Image.fromarray(make_overlay(p, lab)).save(out_dir / f"{path.stem}{suffix}_overlay.png")
        console.print(f"{path} → {out_dir / (path.stem + '.tif')} "
                      f"({labels[0].shape[0]}×{labels[0].shape[1]}, {len(labels)} page(s))")

