"""Small building blocks shared by several plugins."""

from torch import nn


def channel_gate(channels: int, reduction: int = 16) -> nn.Sequential:
    """Squeeze-and-excitation gate (Hu et al., 2018): (N, C, H, W) → (N, C, 1, 1) in (0, 1).

    Global average pool → 1×1 conv C→C/r → ReLU → 1×1 conv C/r→C → sigmoid.
    """
    hidden = max(1, channels // reduction)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
