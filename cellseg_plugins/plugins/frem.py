"""FREM: Feature Random Enhancement Module (Ando & Hotta, VISAPP 2021, §3 and Fig. 3)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn

from ..hooks import has_feature_list, encoder_channels, transform_encoder_features
from ..registry import PluginConfigError, PluginModule, Range, register_plugin


class FeatureRandomEnhancement(PluginModule):
    """Multiply B of the C bottleneck channels by X in training; (N, C, H, W) → same.

    The channel set is drawn at construction and re-drawn by ``on_epoch_start`` (``per="epoch"``)
    or ``on_step_start`` (``per="batch"``); ``fixed=True`` never re-draws. With ``seed=None`` the
    draws use torch's global RNG (so a seeded training run is reproducible); with a seed, the
    draw for epoch/step t uses seed + t. In eval mode the input is returned untouched (the same
    tensor), unless ``at_test=True``.
    """

    def __init__(self, channels: int, B: int, X: float, per: str, fixed: bool, at_test: bool,
                 seed: int | None):
        super().__init__()
        self.C, self.B, self.X = channels, B, X
        self.per, self.fixed, self.at_test, self.seed = per, fixed, at_test, seed
        self.register_buffer("selected", torch.zeros(B, dtype=torch.long))
        self.redraw(0)

    def redraw(self, t: int) -> None:
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + t)
        draw = torch.randperm(self.C, generator=generator)[: self.B]
        self.selected.copy_(draw, non_blocking=True)  # from pageable memory: no device wait

    def on_epoch_start(self, epoch: int) -> None:
        if self.per == "epoch" and not self.fixed:
            self.redraw(epoch)

    def on_step_start(self, step: int) -> None:
        if self.per == "batch" and not self.fixed:
            self.redraw(step)

    def scale(self, dtype, device) -> torch.Tensor:
        """(C,) vector: X at the selected channels, 1 elsewhere."""
        s = torch.ones(self.C, dtype=dtype, device=device)
        s[self.selected] = self.X
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.at_test):
            return x
        return x * self.scale(x.dtype, x.device).view(1, -1, 1, 1)


def channel_count(B: int | float, channels: int, what: str) -> int:
    """B as a count (int) or as a share of ``channels`` (float < 1): the number of channels."""
    count = B if isinstance(B, int) else max(1, round(B * channels))
    if isinstance(B, float) and B >= 1:
        raise PluginConfigError(f"{what}: B={B} as a float is a share of the channels; "
                                "give a share below 1, or an int count")
    if count > channels:
        raise PluginConfigError(f"{what}: B={B} is larger than the bottleneck's {channels} "
                                "channels")
    return count


@register_plugin("frem", supports=has_feature_list)
def frem(
    model: nn.Module,
    B: Annotated[int | float, Range(0, lo_open=True)] = 8,
    X: Annotated[float, Range(0, None)] = 250.0,
    per: Literal["epoch", "batch"] = "epoch",
    fixed: bool = False,
    at_test: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """Feature Random Enhancement: multiply B random bottleneck channels by X while training.

    "the encoder's output is enhanced by multiplying feature maps selected randomly at each
    epoch by X. The number of feature maps selected randomly is denoted as B" (§3.2); "Our
    method is not used in test phase" (§3.1). Defaults are the paper's ssTEM values, B=8,
    X=250 (found by TPE), chosen "from 512 feature maps" (§4.2). ``B`` is a count (int) or a
    share of the bottleneck's channels (float below 1): ``B=0.015625`` is the paper's 8/512
    on any bottleneck (2 of the 8…128 U-Net's 128). ``per``: re-draw every epoch (paper) or
    every batch; ``fixed``: one fixed set (the paper's additional experiment); ``at_test``:
    enhance in eval mode too (extended paper, Table 1).
    """
    channels = encoder_channels(model)[-1]
    module = FeatureRandomEnhancement(channels, channel_count(B, channels, "frem"), X, per,
                                      fixed, at_test, seed)
    transform_encoder_features(model, "frem", {-1: module})
    return model
