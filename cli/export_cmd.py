"""``cellseg export``: TorchScript, ONNX or a BioImage Model Zoo package from a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console



def export_command(
    checkpoint: Annotated[str, typer.Argument(help="a best.pt / last.pt")],
    format: Annotated[str, typer.Option(help="torchscript, onnx or bioimageio")] = "onnx",
    out: Annotated[str | None, typer.Option(
        help="output file (default: beside the checkpoint, e.g. best.onnx)")] = None,
    opset: Annotated[int | None, typer.Option(
        help="ONNX opset, 17 … 23 (default: 23 with global attention, else 18)")] = None,
    author: Annotated[str | None, typer.Option(help="bioimageio: the author's name")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output file")] = False,
) -> None:
    """Export a checkpoint; the exported model is checked against PyTorch before it is kept."""
    from ..engine.export import export_checkpoint

    path = export_checkpoint(checkpoint, format, out, opset, overwrite, author=author)
    Console(stderr=True).print(f"wrote {path}")
