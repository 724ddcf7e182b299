"""Training options shared by ``train``, ``cv`` and ``tune``, defined once.

``@with_train_options()`` adds every option of :data:`TRAIN_OPTIONS` to a command's signature
(Typer reads ``__signature__``) and hands the command a ready ``cfg: TrainConfig``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated

import typer

from ..engine.presets import apply_preset, describe_presets
from ..engine.train import TrainConfig

Spec = Annotated[str, typer.Argument(help="model spec, e.g. 'unet+lfa(m=7)'")]
Out = Annotated[str, typer.Option(help="output folder")]

_DEFAULTS = TrainConfig(spec="unet")
TRAIN_OPTIONS = {  # name → (type, help); defaults come from TrainConfig
    "data": (str, "synthetic (built in), sstem, or a folder"),
    "classes": (str | None, "sstem class map: sstem5 or sstem4"),
    "class_map": (str | None, "mask grey levels, e.g. '0:bg,255:cell'"),
    "epochs": (int, "training epochs"),
    "batch_size": (int, "crops per batch"),
    "lr": (float, "learning rate"),
    "optimizer": (str, "adam or sgd"),
    "schedule": (str, "none or cosine"),
    "loss": (str, "ce, focal+iou or dice+ce"),
    "class_weights": (str, "none or auto (median frequency)"),
    "device": (str, "auto, cpu or cuda"),
    "amp": (bool, "mixed precision"),
    "seed": (int, "random seed"),
    "fold": (int, "test fold index"),
    "folds": (int, "number of folds (split by source image)"),
    "crop": (int, "non-overlapping crop size"),
    "augment": (bool, "random 90° rotations and flips"),
    "workers": (int, "data-loader worker processes"),
}


PRESET_HELP = (f"a paper's training settings for the options not given ({describe_presets()}); "
               "without it the defaults are quick ones")


def with_train_options(skip: tuple[str, ...] = (), **defaults):
    """Decorator: the command gains the training options (less ``skip``; ``defaults`` override
    TrainConfig's) and ``--preset``, and receives them as ``cfg`` (its ``spec`` and ``out``
    parameters included). A preset fills the options not given on the command line."""

    def deco(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.name != "cfg"]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                              default=defaults.get(name, getattr(_DEFAULTS, name)),
                              annotation=Annotated[tp, typer.Option(help=text)])
            for name, (tp, text) in TRAIN_OPTIONS.items() if name not in skip
        ]
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
            cfg = TrainConfig(spec=kwargs["spec"], out=kwargs["out"], **train)
            cfg = apply_preset(cfg, preset, given | set(skip))
            return fn(cfg=cfg, **kwargs)

        params = own + added + extra
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return deco
