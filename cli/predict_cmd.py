"""``cellseg predict``: label files for images of any size (engine.predict.predict_paths)."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import options as o
from .errors import CLIError

console = Console(stderr=True)


def _positive(value: float | None) -> float | None:
    if value is not None and not value > 0:  # NaN too
        raise typer.BadParameter(f"{value}: a pixel size in nm must be > 0")
    return value


def predict_command(
    checkpoint: Annotated[str, typer.Argument(
        help="a best.pt / last.pt, an exported .onnx, a BioImage Model Zoo .zip, or a "
             "cellseg cv folder (its runs' models predict together, probabilities averaged)")],
    inputs: Annotated[list[str], typer.Argument(help="images, folders or TIFF stacks")],
    out: o.Out = "predictions",
    tile: Annotated[int, typer.Option(help="tile size")] = 256,
    overlap: Annotated[int, typer.Option(help="tile overlap in pixels")] = 32,
    overlay: Annotated[bool, typer.Option(help="also write colour overlay PNGs")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    runtime: Annotated[str, typer.Option(help="torch, or onnx (ONNX Runtime on the CPU)")
                       ] = "torch",
    resume: Annotated[bool, typer.Option(
        help="keep the label files in --out that this model, runtime, tile and overlap wrote "
             "already (an interrupted batch goes on where it stopped)")] = False,
    rescale: Annotated[bool, typer.Option(
        help="rescale an image whose pixel size differs from the training images' (by more "
             "than 1.25x) to theirs, and its labels back")] = False,
    pixel_size: Annotated[float | None, typer.Option(
        callback=_positive, help="the inputs' pixel size in nm (default: each file's "
                                 "calibration), for the check against the model's and "
                                 "--rescale")] = None,
    label_format: Annotated[str, typer.Option(
        "--format", help="label files: tif (ImageJ hyperstacks: Fiji, napari) or mrc (on an MRC "
                         "image, its voxel size and origin: IMOD, ChimeraX, Amira)")] = "tif",
    tta: Annotated[str, typer.Option(
        help="test-time augmentation: none, flips (4 passes: the image flipped left-right, "
             "up-down, both) or d4 (8: those and their 90° rotations, as training augments); "
             "probabilities averaged")] = "none",
) -> None:
    """Label files (TIFF or MRC, one per input, named after it) for images of any size."""
    from ..engine.train import resolve_device
    from ..engine.predict import predict_paths

    if runtime == "onnx" and device == "cuda":
        raise CLIError("--device cuda: --runtime onnx runs ONNX Runtime on the CPU; use "
                       "--device cpu or auto, or --runtime torch")
    dev = resolve_device(device) if runtime == "torch" else "cpu"
    columns = [TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as progress:  # a bar, not lines in a log
        task = progress.add_task("tiles", total=None)
        predict_paths(checkpoint, inputs, out, tile, overlap, overlay, dev, runtime,
                      on_image=lambda path, target, shape: progress.console.print(
                          f"{path} → {target} ({shape[-2]}×{shape[-1]}, "
                          f"{math.prod(shape[:-2])} page(s))"),
                      progress=lambda done, total: progress.update(task, completed=done,
                                                                   total=total),
                      resume=resume,
                      on_kept=lambda path, target: progress.console.print(
                          f"{path} → {target} (kept: this model wrote it already)"),
                      on_warning=lambda text: progress.console.print(
                          f"warning: {text}", style="yellow", soft_wrap=True, markup=False),
                      rescale=rescale, pixel_size=pixel_size,
                      on_rescale=lambda path, factor: progress.console.print(
                          f"{path}: rescaled by {factor:.3g} to the model's pixel size, its "
                          "labels back", soft_wrap=True, markup=False),
                      label_format=label_format, tta=tta)
