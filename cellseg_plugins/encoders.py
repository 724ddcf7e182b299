"""The classic U-Net encoder ("double conv" blocks), registered in smp's encoder table.

Names ``plain4`` … ``plain64`` give the first block's width (``plain`` = ``plain64``); each level
doubles it:
``plain8`` with depth 4 is the Feedback U-Net paper's 8-16-32-64-128 network, ``plain64`` with
depth 4 is the original U-Net's 64…1024. Unlike smp's encoders, feature 0 is not the raw input
but the first block's output (full resolution, two 3×3 convs): the "after two convs" feature
Feedback Attention feeds back into.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import nn

from .blocks import SqueezeExcitation

PLAIN_WIDTHS = (4, 8, 16, 32, 64)


class DoubleConv(nn.Sequential):
    """(3×3 conv → BatchNorm → ReLU) × 2, then an SE block if ``se_reduction`` is given;
    (N, C_in, H, W) → (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, se_reduction: int | None = None):
        layers = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if se_reduction is not None:
            layers.append(SqueezeExcitation(out_channels, se_reduction))
        super().__init__(*layers)


class PlainEncoder(nn.Module, EncoderMixin):
    """Classic U-Net contracting path: features[i] has ``width·2^i`` channels at stride 2^i."""

    def __init__(self, width: int = 64, depth: int = 5, output_stride: int = 32,
                 se_reduction: int | None = None):
        super().__init__()
        if output_stride != 32:
            raise ValueError("the plain encoder has no dilated mode; use encoder_output_stride=32")
        widths = [width * 2**i for i in range(depth + 1)]
        self._depth = depth
        self._in_channels = 3
        self._out_channels = widths
        self._output_stride = output_stride
        self.stem = DoubleConv(3, widths[0], se_reduction)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i - 1], widths[i], se_reduction))
            for i in range(1, depth + 1)
        )

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        self._in_channels = in_channels
        self.stem[0] = nn.Conv2d(in_channels, self._out_channels[0], 3, padding=1, bias=False)

    def get_stages(self):
        return {2**i: [self.stages[i - 1]] for i in range(1, self._depth + 1)}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


PLAIN_ENCODERS = {"plain": 64, **{f"plain{w}": w for w in PLAIN_WIDTHS}}


def is_plain(encoder_name: str) -> bool:
    return encoder_name in PLAIN_ENCODERS


for _name, _width in PLAIN_ENCODERS.items():
    smp_encoders[_name] = {
        "encoder": PlainEncoder,
        "pretrained_settings": {},
        "params": {"width": _width},
    }
