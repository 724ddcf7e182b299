"""scSE: concurrent spatial and channel squeeze-and-excitation (Roy et al., 2018)."""

from typing import Annotated, Literal

import torch
from torch import nn

from ..blocks import channel_gate
from ..hooks import (decoder_out_channels, encoder_channels, encoder_strides, has_feature_list,
                     transform_decoder_output, transform_encoder_features)
from ..registry import Range, register_plugin


class SCSE(nn.Module):
    """x·cSE(x) + x·sSE(x); (N, C, H, W) → (N, C, H, W).

    cSE: global pool → 1×1 conv C→C/r → ReLU → 1×1 conv → sigmoid (per channel);
    sSE: 1×1 conv C→1 → sigmoid (per pixel).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.cse = channel_gate(channels, reduction)
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cse(x) + x * self.sse(x)


@register_plugin("scse", supports=has_feature_list)
def scse(model: nn.Module, reduction: Annotated[int, Range(1, 1024)] = 16,
         where: Literal["encoder", "decoder", "both"] = "both") -> nn.Module:
    """Squeeze-and-excitation (scSE) on every encoder stage and/or the decoder output.

    ``where="encoder"`` recalibrates each encoder feature (stride 2 and deeper, so every skip
    and the bottleneck); ``"decoder"`` the decoder's output feature; ``"both"`` (default) does
    both, which approximates the "U-Net + SE" base network of the FREM paper on any arch.
    """
    if where in ("encoder", "both"):
        chans, strides = encoder_channels(model), encoder_strides(model)
        transform_encoder_features(model, "scse_encoder", {
            i: SCSE(c, reduction) for i, (c, s) in enumerate(zip(chans, strides))
            if s > 1 and c > 0})
    if where in ("decoder", "both"):
        transform_decoder_output(model, "scse_decoder", SCSE(decoder_out_channels(model), reduction))
    return model
