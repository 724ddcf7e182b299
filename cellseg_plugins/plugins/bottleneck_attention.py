"""Global SAGAN-style self-attention on the bottleneck ("U-Net + self-attention", LFA baseline)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..hooks import FEATURE_LIST_ARCHS, encoder_channels, transform_encoder_features
from ..registry import register_plugin


class SelfAttention2d(nn.Module):
    """SAGAN self-attention (Zhang et al., 2019): x + γ·Conv(V·softmax(QᵀK)), γ initialised to 0.

    Q, K: 1×1 convs to C/8; V: 1×1 conv to C/2, back to C after aggregation.
    (N, C, H, W) → (N, C, H, W); uses scaled_dot_product_attention with scale 1 (SAGAN's
    unscaled dot product), so no (HW)² tensor is kept where a fused kernel exists.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.q = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.k = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.v = nn.Conv2d(channels, max(1, channels // 2), 1)
        self.out = nn.Conv2d(max(1, channels // 2), channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (N, HW, C/2)
        y = y.transpose(1, 2).reshape(n, -1, h, w)
        return x + self.gamma * self.out(y)


@register_plugin("bottleneck_attention", supports=FEATURE_LIST_ARCHS)
def bottleneck_attention(model: nn.Module) -> nn.Module:
    """Global self-attention (SAGAN) on the deepest encoder feature."""
    channels = encoder_channels(model)[-1]
    transform_encoder_features(model, "bottleneck_attention", {-1: SelfAttention2d(channels)})
    return model
