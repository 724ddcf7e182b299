"""``cellseg eval``: per-class IoU of a checkpoint on a split (engine.evaluation)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


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
    data_on_device: Annotated[bool | None, typer.Option(
        "--data-on-device/--no-data-on-device",
        help="hold the split's crops on the device (default: when they fit)")] = None,
    tta: Annotated[str, typer.Option(
        help="test-time augmentation: none, flips (4 passes: the image flipped left-right, "
             "up-down, both) or d4 (8: those and their 90° rotations, as training augments); "
             "probabilities averaged")] = "none",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Per-class IoU, mIoU and pixel accuracy over all pixels of a split."""
    from ..engine.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, split, device, round, classes, class_map,
                                 data_on_device, tta)
    images, crops, spec = result.pop("images"), result.pop("crops"), result.pop("spec")
    if as_json:
        print(json.dumps(result))
        return
    augmented = "" if tta == "none" else f", test-time augmentation {tta}"
    table = Table(title=f"{spec} — {split} split ({images} images, {crops} crops{augmented})")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in result["iou"].items():
        table.add_row(name, "n/a" if value is None else f"{value:.4f}")
    table.add_row("[bold]mIoU[/]", f"[bold]{result['miou']:.4f}[/]")
    table.add_row("pixel accuracy", f"{result['pixel_accuracy']:.4f}")
    Console().print(table)
