"""Training options shared by ``train``, ``cv``, ``tune`` and ``study``, built from TrainConfig.

``@with_train_options()`` adds an option for every documented field of
:class:`~cellseg_plugins.engine.config.TrainConfig` (its help text and default come from the
field) plus ``--preset`` to a command's signature (Typer reads ``__signature__``) and hands the
command a ready ``cfg: TrainConfig``. Choices stay plain strings on the command line so that
the engine's check names the option and what it allows.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Literal

import typer

from ..engine.config import TrainConfig, option_fields
from ..engine.presets import apply_preset, describe_presets


_INVOCATION: list[str] = []


def set_invocation(words: list[str]) -> None:
    """Keep the command line ``cellseg`` was given (its words after the program name)."""
    _INVOCATION[:] = words


def invocation() -> list[str]:
    """The words of the running ``cellseg`` command line (after the program name)."""
    return list(_INVOCATION)


def folder_problem(value: str) -> str | None:
    """Why ``value`` cannot be a folder to write into (a file, under a file, in a folder that
    cannot be written), or None."""
    path = Path(value)
    for existing in (path, *path.parents):
        if existing.exists():
            what = "" if existing == path else f" lies in {str(existing)!r}, which"
            if not existing.is_dir():
                return f"{value!r}{what} is a file, not a folder"
            if not os.access(existing, os.W_OK | os.X_OK):
                return f"{value!r}{what} is not writable"
            return None
    return None


def folder(value: str | None) -> str | None:
    """Typer callback of the options that name a folder to write into: refuses, before any
    work, a path :func:`folder_problem` finds fault with."""
    problem = None if value is None else folder_problem(value)
    if problem:
        raise typer.BadParameter(problem)
    return value


Spec = Annotated[str, typer.Argument(help="model spec, e.g. 'unet+lfa(m=7)'")]
Out = Annotated[str, typer.Option(help="output folder", callback=folder)]

_DEFAULTS = TrainConfig(spec="unet")
PRESET_HELP = (f"a paper's training settings for the options not given ({describe_presets()}); "
               "without it the defaults are quick ones")


def cli_type(annotation):
    """The command-line type of a field: its base type, Literal choices as plain str."""
    base = typing.get_args(annotation)[0]
    args = typing.get_args(base)
    if typing.get_origin(base) is Literal:
        return str
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return (str if typing.get_origin(inner) is Literal else inner) | None
    return base


def _option(name: str, annotation, text: str, default) -> inspect.Parameter:
    tp = cli_type(annotation)
    decls = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"] if tp == (
        bool | None) else []
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[tp, typer.Option(*decls, help=text)])


def with_train_options(skip: tuple[str, ...] = (), **defaults):
    """Decorator: the command gains the training options (less ``skip``; ``defaults`` override
    TrainConfig's) and ``--preset``, and receives them as ``cfg`` (its ``spec`` and ``out``
    parameters included). A preset fills the options not given on the command line. A
    command with a ``given`` parameter also receives the names of the options set on the
    command line or by the preset."""

    def deco(fn):
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in ("cfg", "given")]
        added = [_option(name, annotation, text, defaults.get(name, getattr(_DEFAULTS, name)))
                 for name, annotation, text in option_fields() if name not in skip]
        extra = [
            inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[str | None, typer.Option(help=PRESET_HELP)]),
            inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
        ]

        @functools.wraps(fn)
        def command(**kwargs):
            ctx, preset = kwargs.pop("ctx"), kwargs.pop("preset")
            train = {p.name: kwargs.pop(p.name) for p in added}
            given = {name for name in train
                     if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
            plain = TrainConfig(spec=kwargs["spec"], out=kwargs["out"], **train)
            cfg = apply_preset(plain, preset, given | set(skip))
            if "given" in signature.parameters:
                kwargs["given"] = given | {name for name in train if getattr(cfg, name) !=
                                           getattr(plain, name)} | ({"preset"} if preset else set())
            return fn(cfg=cfg, **kwargs)

        params = own + added + extra
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return deco


def check_jobs(jobs: int, threads: int | None) -> None:
    """One-line errors for --jobs / --threads below 1."""
    from .errors import CLIError

    if jobs < 1:
        raise CLIError(f"--jobs {jobs}: must be ≥ 1")
    if threads is not None and threads < 1:
        raise CLIError(f"--threads {threads}: must be ≥ 1")
