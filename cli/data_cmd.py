"""``cellseg data fetch | info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import options as o
from .errors import CLIError

data_app = typer.Typer(help="Fetch and inspect data sets.", no_args_is_help=True)


@data_app.command("fetch")
def fetch_command(
    name: Annotated[str, typer.Argument(help="data set name: sstem")],
    root: Annotated[str | None, typer.Option(help="data root (default $CELLSEG_DATA or cache)",
                                             callback=o.folder)] = None,
    from_: Annotated[str | None, typer.Option("--from", help="a local copy (folder) or base URL")] = None,
) -> None:
    """Download a data set (or import a local copy), verifying every file's SHA-256."""
    from ..engine.data import fetch_sstem

    if name != "sstem":
        raise CLIError(f"unknown data set {name!r}; available: sstem")
    target = fetch_sstem(Path(root) if root else None, from_)
    Console(stderr=True).print(f"sstem verified at {target}")


@data_app.command("info")
def info_command(
    data: Annotated[str, typer.Argument(help="synthetic, sstem or a folder")],
    classes: Annotated[str | None, typer.Option(help="sstem5 or sstem4")] = None,
    class_map: Annotated[str | None, typer.Option(help="e.g. '0:bg,255:cell'")] = None,
) -> None:
    """Images, sizes, pixel sizes, classes and pixel shares of a data set."""
    from ..engine.data import class_shares, load_data
    from ..engine.image_files import describe_pixel_sizes

    sources = load_data(data, classes, class_map)
    sizes = sorted({tuple(m.shape) for m in sources.masks})
    console = Console()
    console.print(f"{data}: {len(sources.images)} images, sizes {sizes}, "
                  f"{sources.in_channels} channel(s), pixel size "
                  f"{describe_pixel_sizes(sources.pixel_sizes)}")
    table = Table("class", "index", "pixel share")
    for i, (name, share) in enumerate(zip(sources.class_names, class_shares(sources))):
        table.add_row(name, str(i), f"{100 * share:.2f} %")
    console.print(table)
