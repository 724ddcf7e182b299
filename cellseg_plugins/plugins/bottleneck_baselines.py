"""The FREM paper's baselines at the bottleneck: deep supervision and channel dropout."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ..hooks import FEATURE_LIST_ARCHS, classes_of, encoder_channels, transform_encoder_features
from ..registry import PluginModule, Range, register_plugin


class BottleneckSupervision(PluginModule):
    """1×1 conv C→classes on the bottleneck; its logits are an auxiliary output (weight λ).

    The feature passes through unchanged; the protocol upsamples the logits to the target size.
    """

    def __init__(self, channels: int, classes: int, lam: float):
        super().__init__()
        self.lam = lam
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.add_aux("bottleneck_supervision", self.lam, self.classifier(x))
        return x


@register_plugin("bottleneck_supervision", supports=FEATURE_LIST_ARCHS)
def bottleneck_supervision(model: nn.Module,
                           lam: Annotated[float, Range(0, None)] = 0.3) -> nn.Module:
    """Deep supervision at the bottleneck: λ·CE(upsampled 1×1-conv logits) (FREM baseline)."""
    module = BottleneckSupervision(encoder_channels(model)[-1], classes_of(model), lam)
    transform_encoder_features(model, "bottleneck_supervision", {-1: module})
    return model


@register_plugin("bottleneck_dropout", supports=FEATURE_LIST_ARCHS)
def bottleneck_dropout(model: nn.Module,
                       p: Annotated[float, Range(0, 0.99)] = 8 / 512) -> nn.Module:
    """Channel dropout (Dropout2d) on the bottleneck; default rate B/C = 8/512 (FREM baseline)."""
    transform_encoder_features(model, "bottleneck_dropout", {-1: nn.Dropout2d(p)})
    return model
