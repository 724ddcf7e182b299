"""``cellseg study run | report``: a paper's table from a study file, with statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import options as o

study_app = typer.Typer(help="Run a study file (rows × folds × seeds) and report its table.",
                        no_args_is_help=True)


@study_app.command("run")
def study_run(
    file: Annotated[str, typer.Argument(help="a study file, e.g. studies/sstem5.toml")],
    scale: Annotated[str | None, typer.Option(help="a [scale.NAME] table of the file")] = None,
    jobs: Annotated[int, typer.Option(help="runs at a time, each in its own process")] = 1,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads per run (default: the cores split between the jobs)")] = None,
    out: Annotated[str | None, typer.Option(
        help="output folder (default: runs/study/<file>-<scale>)", callback=o.folder)] = None,
    rows: Annotated[list[str] | None, typer.Option(
        "--rows", help="run only the rows whose names match (shell pattern, repeatable)")] = None,
    then_report: Annotated[bool, typer.Option("--report/--no-report",
                                              help="write the table when done")] = True,
) -> None:
    """Train and test every row × fold × seed not finished yet; finished runs are kept."""
    from ..engine.study import load_study, report, run_study
    from ..engine.train import emulation_note
    from .errors import CLIError

    o.check_jobs(jobs, threads)
    study = load_study(file, scale)
    folder = Path(out or f"runs/study/{study.name}-{study.scale}")
    problem = None if out else o.folder_problem(str(folder))
    if problem:
        raise CLIError(f"--out (default {folder}): {problem}; pass --out DIR")
    console = Console(stderr=True)

    def start(selected, pending):
        console.print(f"[bold]{study.title}[/] at scale {study.scale}: {len(selected)} of "
                      f"{len(study.rows)} rows × {study.folds} folds × {study.seeds} seed(s), "
                      f"{pending} run(s) to do → {folder}")
        note = emulation_note(study.config.device, study.config.precision,
                              "the study's runs are slower here than in fp32 (every row of a "
                              "study shares its precision)")
        if pending and note:
            console.print(note)

    run_study(study, folder, jobs, threads, rows=rows, on_start=start,
              on_run=lambda label, r: console.print(f"{label}: test mIoU {r['miou']:.4f}"))
    if then_report:
        compared = report(folder)["comparisons"]
        console.print(f"wrote {folder / 'table.md'}, table.csv, "
                      + ("comparisons.csv " if compared else "") + "and gains.png")


@study_app.command("report")
def study_report(
    folder: Annotated[str, typer.Argument(help="a study's output folder")],
    out: Annotated[str | None, typer.Option(help="where to write the table (default: FOLDER)",
                                            callback=o.folder)] = None,
) -> None:
    """Write table.md, table.csv, gains.png (and comparisons.csv) from finished runs."""
    from ..engine.study import report

    report(Path(folder), Path(out) if out else None)
    print((Path(out or folder) / "table.md").read_text())
