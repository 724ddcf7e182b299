"""The ``cellseg`` command: ``cellseg list | bench | ...``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from typer import Abort

try:  # newer typer vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError

from .errors import USER_ERRORS, user_message
from .bench_cmd import bench_command
from .cv_cmd import cv_command
from .data_cmd import data_app
from .eval_cmd import eval_command
from .export_cmd import export_command
from .list_cmd import list_command
from .options import set_invocation
from .predict_cmd import predict_command
from .study_cmd import study_app
from .train_cmd import train_command
from .tune_cmd import tune_command

app = typer.Typer(
    name="cellseg",
    help="Cell-image segmentation methods as plugins for any smp model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("list")(list_command)
app.command("bench")(bench_command)
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("predict")(predict_command)
app.command("cv")(cv_command)
app.command("export")(export_command)
app.command("tune")(tune_command)
app.add_typer(data_app, name="data")
app.add_typer(study_app, name="study")


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__
        print(f"cellseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print the version and exit")] = False) -> None:
    """Cell-image segmentation methods as plugins for any smp model."""


INTERRUPTED = {  # what continues an interrupted command; its files on disk are whole
    "train": "; the run's files are whole: the same command with --resume continues from "
             "its last finished epoch",
    "cv": "; finished runs are kept: the same command resumes the others",
    "study run": "; finished runs are kept: the same command resumes the others",
    "tune": "; finished trials are kept in the study: the same command goes on",
    "predict": "; the label files written so far are whole: the same command with --resume "
               "keeps them and writes the rest",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the Typer app; usage errors are printed on one line (exit code 2)."""
    words = argv if argv is not None else sys.argv[1:]
    set_invocation(words)  # train --nproc-per-node runs it again in each process
    try:
        code = app(args=argv, prog_name="cellseg", standalone_mode=False)
    except UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx and e.ctx.parent else ""
        print(f"error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system refused (full disk, permissions, …): one line
        where = f"{e.filename!r}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    if code == 130:  # Ctrl-C (Typer's exit code for KeyboardInterrupt)
        what = INTERRUPTED.get(" ".join(words[:2]), INTERRUPTED.get(" ".join(words[:1]), ""))
        print(f"error: interrupted{what}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
