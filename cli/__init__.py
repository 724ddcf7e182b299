"""Command-line interface (installed as ``cellseg_plugins.cli``): thin Typer commands."""
