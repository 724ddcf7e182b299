"""The input sizes a built model accepts: a side multiple, a minimum, or one fixed size.

Found by trying the model (eval mode, one zero image per candidate size) rather than by
reading each architecture's code: smp's archs, their encoders' depths and strides, dilation,
and the plugins all play a part. Cached on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PluginConfigError
from .hooks import in_channels_of


@dataclass(frozen=True)
class InputRules:
    """Square sides ``multiple``·k with side ≥ ``minimum``; or exactly ``fixed``."""

    multiple: int
    minimum: int
    fixed: int | None = None

    def accepts(self, side: int) -> bool:
        if self.fixed is not None:
            return side == self.fixed
        return side >= self.minimum and side % self.multiple == 0

    def describe(self) -> str:
        if self.fixed is not None:
            return f"exactly {self.fixed}"
        if self.multiple == 1:
            return f"any size ≥ {self.minimum}"
        return f"multiples of {self.multiple}, at least {self.minimum}"

    def fit(self, side: int) -> int:
        """The smallest accepted side ≥ ``side`` (what padding reaches)."""
        if self.fixed is not None:
            return self.fixed
        side = max(side, self.minimum)
        return -(-side // self.multiple) * self.multiple

    def check(self, side: int, what: str) -> None:
        """Raise ValueError naming ``what`` (e.g. '--crop 100') when ``side`` is refused."""
        if not self.accepts(side):
            raise ValueError(f"{what}: this model takes sides {self.describe()} "
                             f"(e.g. {self.fit(side)})")


def _failure(model: nn.Module, side: int) -> Exception | None:
    """Why ``model`` cannot run a ``side``² image, or None when it can. A model that runs but
    whose output is not ``side``² raises PluginConfigError: no input size would help."""
    x = torch.zeros(1, in_channels_of(model), side, side,
                    device=next(model.parameters()).device)
    try:
        out = model(x)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        return e
    out = out[0] if isinstance(out, (tuple, list)) else out
    if tuple(out.shape[-2:]) != (side, side):
        raise PluginConfigError(f"{getattr(model, 'cellseg_spec', type(model).__name__)}: a "
                                f"{side}×{side} input gives {out.shape[-2]}×{out.shape[-1]} "
                                f"outputs; the output must have the input's size{_hint(model, side, out.shape[-1])}")
    return None


def _hint(model: nn.Module, side: int, out_side: int) -> str:
    """The ``upsampling`` that gives outputs of the input's size, for smp's heads."""
    head = getattr(model, "segmentation_head", None)
    scale = next((m.scale_factor for m in head.modules() if isinstance(m, nn.Upsample)), 1) \
        if isinstance(head, nn.Module) else None
    factor = None if scale is None else float(scale) * side / out_side
    if factor is None or factor < 1 or factor != int(factor):
        return ""
    return f" (upsampling={int(factor)} gives it)"


@torch.no_grad()
def input_rules(model: nn.Module) -> InputRules:
    """The model's :class:`InputRules` (computed once, then cached on the model)."""
    if "cellseg_input_rules" in model.__dict__:
        return model.cellseg_input_rules
    fixed = next((int(m.img_size[0]) for m in model.modules()
                  if getattr(m, "strict_img_size", False) and getattr(m, "img_size", None)), None)
    encoder = getattr(model, "encoder", None)
    stride = getattr(encoder, "output_stride", 32) if encoder is not None else 32
    multiple = stride if getattr(model, "requires_divisible_input_shape", True) else 1
    was_training = model.training
    model.eval()
    try:
        if fixed is not None:
            rules = InputRules(fixed, fixed, fixed)
        else:
            candidates = sorted({multiple * k for k in range(1, 17)} |
                                {2 ** k for k in range(10) if 2 ** k % multiple == 0})
            for side in candidates:
                failure = _failure(model, side)
                if failure is None:
                    break
            else:  # a size rule would blame the input for what is the model's fault
                what = getattr(model, "cellseg_spec", type(model).__name__)
                why = " ".join(str(failure).split())
                raise PluginConfigError(
                    f"{what} runs on no input size from {candidates[0]}² to {candidates[-1]}² "
                    f"({type(failure).__name__}: {why[:240]}{'…' if len(why) > 240 else ''})")
            rules = InputRules(multiple, side)
    finally:
        model.train(was_training)
    model.cellseg_input_rules = rules
    return rules
