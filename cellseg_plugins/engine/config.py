"""The training configuration: typed fields with their help text, checked in one place.

Each field's annotation says what it takes (``Literal`` choices, :class:`Range` bounds) and a
:class:`Doc` says what it is; the CLI builds its options from these (``cellseg train --help``),
so a choice is written once. A bad value raises :class:`ConfigError` naming the field
(``lr=-1: must be > 0``); the CLI shows it as the option (``--lr -1: must be > 0``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Literal

from ..errors import ConfigError
from ..registry.schema import Range, check_value


@dataclass(frozen=True)
class Doc:
    """Help text of a configuration field."""

    text: str


@dataclass
class TrainConfig:
    spec: str
    data: Annotated[str, Doc("synthetic (built in), sstem, or a folder")] = "synthetic"
    classes: Annotated[Literal["sstem5", "sstem4"] | None, Doc("sstem class map")] = None
    class_map: Annotated[str | None, Doc("mask grey levels, e.g. '0:bg,255:cell'")] = None
    pixel_size: Annotated[float | None, Range(0, lo_open=True), Doc(
        "the training images' pixel size in nm, kept with the model so that predict can warn "
        "about (or --rescale) images of another (default: their files' calibration; ssTEM's "
        "4.6)")] = None
    epochs: Annotated[int, Range(1), Doc("training epochs")] = 20
    batch_size: Annotated[int, Range(1), Doc("crops per batch")] = 8
    lr: Annotated[float, Range(0, lo_open=True), Doc("learning rate")] = 1e-3
    optimizer: Annotated[Literal["adam", "sgd"], Doc("adam or sgd (momentum 0.9)")] = "adam"
    schedule: Annotated[Literal["none", "cosine"], Doc("none or cosine")] = "none"
    loss: Annotated[Literal["ce", "focal+iou", "dice+ce"], Doc("ce, focal+iou or dice+ce")] = "ce"
    class_weights: Annotated[Literal["none", "auto"],
                             Doc("none or auto (median frequency)")] = "none"
    device: Annotated[Literal["auto", "cpu", "cuda"], Doc("auto, cpu or cuda")] = "auto"
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"],
                         Doc("auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16")
                         ] = "auto"
    channels_last: Annotated[bool | None, Doc("channels-last memory format (default: on)")
                             ] = None
    cudnn_benchmark: Annotated[bool | None, Doc("cuDNN autotuning (default: on CUDA)")] = None
    compile: Annotated[bool, Doc("torch.compile the model (inductor)")] = False
    compile_mode: Annotated[Literal["default", "reduce-overhead", "max-autotune"], Doc(
        "torch.compile mode, with --compile: default, reduce-overhead (CUDA graphs: fewer "
        "kernel launches for small models) or max-autotune")] = "default"
    sync_bn: Annotated[bool | None, Doc("BatchNorm over all ranks under torchrun (default: on)")
                       ] = None
    data_on_device: Annotated[bool | None, Doc(
        "hold the splits as tensors on the device, augment there (default: when they fit)")
    ] = None
    checkpoint_every: Annotated[float | None, Range(0), Doc(
        "seconds between checkpoint writes, the best epoch held in memory meanwhile; always "
        "after the last epoch (default: 60 on CUDA, 0 = every epoch on the CPU)")] = None
    init: Annotated[str | None, Doc(
        "fine-tune from these weights: a cellseg checkpoint, a state dict (.pt, .pth, "
        ".safetensors), an smp save_pretrained folder or hf-hub:OWNER/NAME (every tensor "
        "whose name and shape match the model; the rest, e.g. a head for other classes, "
        "starts fresh)")
    ] = None
    seed: Annotated[int, Range(0), Doc("random seed")] = 0
    fold: Annotated[int, Range(0), Doc("test fold index")] = 0
    folds: Annotated[int, Doc("number of folds (split by source image)")] = 5
    crop: Annotated[int, Range(1), Doc(
        "crop side: crops tile each image, plus one flush with an edge the crop does not "
        "divide")] = 256
    augment: Annotated[bool, Doc("random 90° rotations and flips")] = True
    workers: Annotated[int, Range(0), Doc(
        "data-loader worker processes (> 0 takes the loader path unless --data-on-device)")] = 0
    out: str = "runs/latest"
    preset: str | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise ConfigError naming the first field with a bad value; canonicalise the spec."""
        from ..registry import parse_spec

        for name, annotation, _ in option_fields():
            check_field(name, annotation, getattr(self, name))
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError("compile_mode", self.compile_mode, "needs --compile")
        if self.init is not None and not self.init.strip():
            raise ConfigError("init", self.init, "expected a checkpoint, a state dict (.pt, "
                              ".pth, .safetensors), an smp save_pretrained folder or "
                              "hf-hub:OWNER/NAME")
        if self.workers and self.data_on_device:
            raise ConfigError("workers", self.workers, "loader workers with --data-on-device, "
                              "where the crops are drawn on the device: use one of the two")
        self.spec = str(parse_spec(self.spec))


# What a run learns from: a resumed run keeps these (the other options say how it runs —
# device, precision, layout, compile, workers, checkpoint interval — and may change).
RUN_OPTIONS = ("preset", "data", "classes", "class_map", "batch_size", "lr", "optimizer",
               "schedule", "loss", "class_weights", "init", "seed", "fold", "folds", "crop",
               "augment")


def resumed_config(cfg: TrainConfig, saved: dict, given: set[str] | None = None) -> TrainConfig:
    """The configuration that continues the run whose last.pt holds ``saved``: RUN_OPTIONS
    and ``epochs`` not in ``given`` come from the run (``given`` None: every option was
    given); a given RUN_OPTION that differs from the run's raises ConfigError (``epochs`` may
    differ: it extends or shortens the run)."""
    taken = {name: saved[name] for name in RUN_OPTIONS + ("epochs",)
             if name in saved and given is not None and name not in given}
    cfg = replace(cfg, **taken)
    differs = first_difference(cfg, saved, RUN_OPTIONS)
    if differs:
        advice = ("continue it with that value" if given is None
                  else "leave the option out to continue it")
        raise ConfigError(differs, getattr(cfg, differs), f"the run in {cfg.out!r} was trained "
                          f"with {shown(saved[differs])}; {advice}, or use another --out")
    return cfg


def first_difference(cfg: TrainConfig, saved: dict, names) -> str | None:
    """The first of ``names`` whose value in ``saved`` (a run's stored configuration) is not
    cfg's; names the run did not store are skipped. A spec is compared canonically."""
    from ..registry import parse_spec

    for name in names:
        if name not in saved:
            continue
        ours = str(parse_spec(cfg.spec)) if name == "spec" else getattr(cfg, name)
        if not _same(name, ours, saved[name]):
            return name
    return None


def as_option(name: str, value) -> str:
    """A setting as a command line gives it: ``--lr 0.1``, ``SPEC 'unet'``."""
    return f"SPEC {value}" if name == "spec" else f"--{name.replace('_', '-')} {value}"


def shown(value) -> str:
    """A stored option value as a message shows it."""
    return "none" if value is None else repr(value)


def _same(name: str, a, b) -> bool:
    if name == "data" and a not in ("synthetic", "sstem") and b not in ("synthetic", "sstem"):
        return Path(a).resolve() == Path(b).resolve()
    if name == "init" and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def option_fields() -> list[tuple[str, object, str]]:
    """(name, annotation, help) of every field that is a command-line option."""
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    out = []
    for f in fields(TrainConfig):
        docs = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Doc)]
        if docs:
            out.append((f.name, hints[f.name], docs[0].text))
    return out


def check_field(name: str, annotation, value) -> None:
    base, *meta = typing.get_args(annotation)
    choices = _choices(base)
    if choices is not None:
        if value not in choices:
            allowed = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(name, value, f"expected one of {allowed}")
        return
    try:
        check_value(base, value)
    except ValueError as e:
        raise ConfigError(name, value, str(e)) from None
    for m in meta:
        if isinstance(m, Range) and value is not None and not m.contains(value):
            if m.lo is not None and (value <= m.lo if m.lo_open else value < m.lo):
                reason = f"must be {'>' if m.lo_open else '≥'} {m.lo:g}"
            else:
                reason = f"must be ≤ {m.hi:g}"
            raise ConfigError(name, value, reason)


def _choices(tp) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        found = _choices(inner[0]) if len(inner) == 1 else None
        return None if found is None else (*found, None)
    return None
