"""The plugin protocol: how plugin modules talk to a training loop without being named.

A plugin factory takes a built model and returns a model. The modules it adds may subclass
:class:`PluginModule` to

- contribute auxiliary training outputs (``add_aux``), which :func:`auxiliary_loss` turns into
  weighted losses with the training criterion (round-1 loss, deep supervision, ...);
- receive ``on_model_built(model)`` once every plugin of the spec is applied (per-round
  BatchNorm then covers the modules of plugins listed after the rounds plugin);
- receive ``on_epoch_start(epoch)`` and ``on_step_start(step)`` callbacks (FREM re-draws its
  channels there);
- behave differently in train and eval mode, through ``self.training`` as any module does.

The training loop calls :func:`epoch_start`, :func:`step_start` and :func:`training_loss` on the
whole model (or on the list :func:`plugin_modules` made of it once); it never names a plugin.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class AuxOutput(NamedTuple):
    """Auxiliary logits (any resolution: resized to the target's) and their loss weight.

    ``main_weight`` multiplies the main loss (1 - λ for a convex combination
    (1 - λ)·L_main + λ·L_aux); :func:`training_loss` applies it.
    """

    name: str
    weight: float
    logits: torch.Tensor
    main_weight: float = 1.0


class PluginModule(nn.Module):
    """Base class for modules that plugins insert; all hooks are optional no-ops."""

    def __init__(self) -> None:
        super().__init__()
        self._aux: list[AuxOutput] = []

    def on_model_built(self, model: nn.Module) -> None:
        """Called once the spec's last plugin is applied (create_model, apply_plugins)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the training loop before each epoch (0-based)."""

    def on_step_start(self, step: int) -> None:
        """Called by the training loop before each optimisation step (0-based, global)."""

    def add_aux(self, name: str, weight: float, logits: torch.Tensor,
                main_weight: float = 1.0) -> None:
        """Record an auxiliary output of the current forward pass (training mode only);
        ``main_weight`` scales the main loss (see :class:`AuxOutput`)."""
        if self.training:
            self._aux.append(AuxOutput(name, float(weight), logits, float(main_weight)))

    def pop_aux(self) -> list[AuxOutput]:
        out, self._aux = self._aux, []
        return out


def plugin_modules(model: nn.Module) -> list[PluginModule]:
    """The model's plugin modules, in module order. A loop that calls the hooks every step
    lists them once and passes the list: walking a model's modules costs a few microseconds
    each (about 0.3 ms for the 90 of the papers' U-Net), host time a GPU step waits for."""
    return [m for m in model.modules() if isinstance(m, PluginModule)]


def _listed(model: nn.Module | list[PluginModule]) -> list[PluginModule]:
    return model if isinstance(model, list) else plugin_modules(model)


def model_built(model: nn.Module) -> None:
    """Tell every plugin module that the model is complete (every plugin applied)."""
    for m in plugin_modules(model):
        m.on_model_built(model)


def epoch_start(model: nn.Module | list[PluginModule], epoch: int) -> None:
    """Tell every plugin module of the model (or of the list) that ``epoch`` begins."""
    for m in _listed(model):
        m.on_epoch_start(epoch)


def step_start(model: nn.Module | list[PluginModule], step: int) -> None:
    """Tell every plugin module of the model (or of the list) that optimisation step ``step``
    begins."""
    for m in _listed(model):
        m.on_step_start(step)


def pop_aux_outputs(model: nn.Module | list[PluginModule]) -> list[AuxOutput]:
    """Collect (and clear) the auxiliary outputs of the last forward pass."""
    return [a for m in _listed(model) for a in m.pop_aux()]


def _weighted_sum(outputs: list[AuxOutput], target: torch.Tensor, criterion: Callable):
    """(Σ weight·criterion, {name: detached loss tensor}): nothing is read back to the host,
    so a CUDA training step does not wait here."""
    total: torch.Tensor | float = 0.0
    parts: dict[str, torch.Tensor] = {}
    for aux in outputs:
        logits = aux.logits
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
        loss = criterion(logits, target)
        total = total + aux.weight * loss
        parts[aux.name] = loss.detach()
    return total, parts


def auxiliary_loss(
    model: nn.Module, target: torch.Tensor, criterion: Callable
) -> tuple[torch.Tensor | float, dict[str, float]]:
    """Σ weight·criterion(aux logits, target) over the last forward's auxiliary outputs.

    Logits smaller than the target are upsampled bilinearly. Returns the weighted sum (0.0 if
    there are none) and each term's value for logging (floats: reading them waits for the
    device). The main loss's own weight (see :class:`AuxOutput`) is applied by
    :func:`training_loss`, which a training loop should use.
    """
    total, parts = _weighted_sum(pop_aux_outputs(model), target, criterion)
    return total, {name: float(loss) for name, loss in parts.items()}


def training_loss(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: Callable,
    plugins: list[PluginModule] | None = None,
) -> torch.Tensor:
    """One training forward: w·criterion(model(x), target) + :func:`auxiliary_loss`'s sum,
    w the product of the auxiliary outputs' ``main_weight`` (1 without any); ``plugins``:
    the model's :func:`plugin_modules`, if the caller listed them."""
    logits = model(x)
    outputs = pop_aux_outputs(model if plugins is None else plugins)
    main_weight = math.prod(a.main_weight for a in outputs)
    aux, _ = _weighted_sum(outputs, target, criterion)
    return main_weight * criterion(logits, target) + aux
