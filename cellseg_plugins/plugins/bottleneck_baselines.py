"""The FREM paper's baselines at the bottleneck: deep supervision and channel dropout."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn

from ..hooks import has_feature_list, classes_of, encoder_channels, transform_encoder_features
from ..registry import PluginConfigError, PluginModule, Range, register_plugin
from .frem import channel_count


class BottleneckSupervision(PluginModule):
    """1×1 conv C→classes on the bottleneck; its logits are an auxiliary output.

    The feature passes through unchanged; the protocol upsamples the logits to the target size.
    ``convex``: the loss is (1-λ)·L_main + λ·L_aux (the FREM paper's Eq. 1), else
    L_main + λ·L_aux.
    """

    def __init__(self, channels: int, classes: int, lam: float, convex: bool):
        super().__init__()
        self.lam, self.convex = lam, convex
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.add_aux("bottleneck_supervision", self.lam, self.classifier(x),
                         main_weight=1 - self.lam if self.convex else 1.0)
        return x


@register_plugin("bottleneck_supervision", supports=has_feature_list)
def bottleneck_supervision(model: nn.Module,
                           lam: Annotated[float, Range(0, 1)] = 0.2781,
                           form: Literal["convex", "add"] = "convex") -> nn.Module:
    """Deep supervision at the bottleneck (FREM baseline): a 1×1 conv to the classes, upsampled.

    "SuperVision uses 1×1 convolution to change the number of channel to the number of classes
    at the end of encoder, and resize it to the size of input image and softmax cross entropy
    loss is computed" with "Loss = (1 − λ) * Loss_1 + λ * Loss_2" (FREM §4.3, Eq. 1;
    ``form='convex'``) and λ = 0.2781 on ssTEM (found by TPE). ``form='add'``:
    L_main + λ·L_aux.
    """
    module = BottleneckSupervision(encoder_channels(model)[-1], classes_of(model), lam,
                                   form == "convex")
    transform_encoder_features(model, "bottleneck_supervision", {-1: module})
    return model


@register_plugin("bottleneck_dropout", supports=has_feature_list)
def bottleneck_dropout(model: nn.Module,
                       B: Annotated[int | float, Range(0, lo_open=True)] = 8,
                       p: Annotated[float, Range(0, 0.99)] | None = None) -> nn.Module:
    """Channel dropout (Dropout2d) on the bottleneck at FREM's rate (FREM baseline).

    "Dropout with the same percentage as the proposed method (Dropout rate = B/the number of
    filters = 8/512)" (FREM §4.3): the rate is B / the bottleneck's actual channels (``B`` a
    count, or a share as a float below 1, as frem takes it); ``p`` sets the rate directly.
    """
    channels = encoder_channels(model)[-1]
    rate = p if p is not None else channel_count(B, channels, "bottleneck_dropout") / channels
    if rate >= 1:
        raise PluginConfigError(f"bottleneck_dropout: rate {rate} drops every channel")
    transform_encoder_features(model, "bottleneck_dropout", {-1: nn.Dropout2d(rate)})
    return model
