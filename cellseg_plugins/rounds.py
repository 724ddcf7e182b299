"""Two-round models: run the whole network twice with shared weights (Feedback U-Net, FA).

:func:`install_rounds` hooks the model's own forward: after round 1 has produced its output,
the hook asks the feedback module for round 2's inputs and runs the model again; round 2's
output is the prediction. Training always runs and returns both rounds, so the main loss falls
on round 2; ``predict=1`` (or :func:`set_prediction_round`) makes an *eval-mode* forward return
round 1 of the normally trained model, the FA paper's Table 4. Round 1's logits are an
auxiliary output of weight λ (λ·L_round1 + L_round2), through the plugin protocol. Other
plugins' auxiliary outputs count once, from round 2 (as the main loss): those recorded in
round 1 are dropped. Every module that must know the round (per-round BatchNorm, recurrent
cells, feedback attention) reads the shared :class:`RoundState`.

Order in a spec: plugins apply left to right; a rounds plugin runs everything the model has
(plugins before and after it) in both rounds. Per-round BatchNorm is installed once the whole
spec is applied (``on_model_built``), so it covers every BatchNorm wherever the rounds plugin
stands. A model has at most one rounds plugin.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .registry import PluginConfigError, PluginModule
from .registry.protocol import plugin_modules, pop_aux_outputs


class RoundState:
    """The round being computed: 0 (first) or 1 (second). Shared, not a module."""

    def __init__(self) -> None:
        self.current = 0


class RoundSwitch(nn.Module):
    """One module per round, chosen by the shared RoundState; input → that module's output."""

    def __init__(self, modules: list[nn.Module], state: RoundState):
        super().__init__()
        self.slots = nn.ModuleList(modules)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slots[self.state.current](x)


class RoundBatchNorm(RoundSwitch):
    """One BatchNorm (statistics and affine parameters) per round; (N, C, H, W) → same."""

    def __init__(self, bn: nn.BatchNorm2d, state: RoundState, rounds: int = 2):
        super().__init__([copy.deepcopy(bn) for _ in range(rounds)], state)


def per_round_batchnorm(model: nn.Module, state: RoundState) -> int:
    """Swap every BatchNorm2d in ``model`` for a RoundBatchNorm; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(parent, RoundSwitch)]
    for parent, name, child in swaps:
        setattr(parent, name, RoundBatchNorm(child, state))
    return len(swaps)


class Feedback(nn.Module):
    """What a rounds plugin feeds back: override ``reset`` and ``round2_inputs``."""

    def reset(self) -> None:
        """Forget the previous forward's state (called before round 1)."""

    def round2_inputs(self, inputs: tuple, round1_output: torch.Tensor) -> tuple:
        """The model's positional inputs for round 2 (default: the same as round 1)."""
        return inputs


class Rounds(PluginModule):
    """Runs the model twice per forward; see the module docstring."""

    def __init__(self, state: RoundState, feedback: Feedback, lam: float, predict: int,
                 per_round_bn: bool = False):
        super().__init__()
        self.state, self.feedback, self.lam, self.predict = state, feedback, lam, predict
        self.per_round_bn = per_round_bn
        self._busy = False
        self.round1_output: torch.Tensor | None = None
        self._plugins: list[PluginModule] | None = None  # the model's, once it is built

    def on_model_built(self, model: nn.Module) -> None:
        self._plugins = plugin_modules(model)  # popped every forward: listed once, not walked
        if self.per_round_bn:
            per_round_batchnorm(model, self.state)

    def pre_hook(self, model, inputs):
        if not self._busy:
            self.state.current = 0
            self.feedback.reset()

    def post_hook(self, model, inputs, output):
        if self._busy:
            return None
        # smp models built with aux_params return (mask logits, label logits): feed the mask back
        logits = output[0] if isinstance(output, (tuple, list)) else output
        self.round1_output = logits.detach()
        if self.predict == 1 and not self.training:
            self.feedback.reset()
            return output
        # other plugins' round-1 auxiliary outputs: round 2's count
        pop_aux_outputs(model if self._plugins is None else self._plugins)
        self._busy = True
        try:
            self.state.current = 1
            second = model(*self.feedback.round2_inputs(inputs, logits))
        finally:
            self._busy = False
            self.state.current = 0
            self.feedback.reset()
        if self.lam > 0:
            self.add_aux("round1", self.lam, logits)
        return second


def install_rounds(model: nn.Module, feedback: Feedback, state: RoundState, lam: float = 0.0,
                   predict: int = 2, per_round_bn: bool = False) -> Rounds:
    """Make ``model`` a two-round model with ``feedback``; attach the controller as ``model.rounds``.

    ``per_round_bn``: swap every BatchNorm for a per-round one once the model is built.
    """
    if any(isinstance(m, Rounds) for m in model.modules()):
        raise PluginConfigError("the model already runs in rounds; use one feedback plugin")
    rounds = Rounds(state, feedback, lam, predict, per_round_bn)
    model.rounds = rounds
    model.register_forward_pre_hook(rounds.pre_hook)
    model.register_forward_hook(rounds.post_hook)
    return rounds


def set_prediction_round(model: nn.Module, predict: int) -> None:
    """Make eval-mode forwards of a two-round model return round ``predict`` (1 or 2).

    Training is unaffected (the loss always falls on round 2). Raises PluginConfigError for
    round 1 of a model without rounds.
    """
    if predict not in (1, 2):
        raise PluginConfigError(f"round {predict}: expected 1 or 2")
    rounds = getattr(model, "rounds", None)
    if not isinstance(rounds, Rounds):
        if predict == 1:
            raise PluginConfigError("round 1 exists only for two-round models (feedback_*)")
        return
    rounds.predict = predict
