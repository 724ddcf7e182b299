"""Small building blocks shared by several plugins and architectures."""

import torch
from torch import nn
from torch.nn import functional as F

from .full_attention import attention


def channel_gate(channels: int, reduction: int = 16) -> nn.Sequential:
    """Squeeze-and-excitation gate (Hu et al., 2018): (N, C, H, W) → (N, C, 1, 1) in (0, 1).

    Global average pool → 1×1 conv C→C/r → ReLU → 1×1 conv C/r→C → sigmoid.
    """
    hidden = max(1, channels // reduction)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid())


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al., 2018): x · channel_gate(x); (N, C, H, W) → (N, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.gate = channel_gate(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def conv_like(conv: nn.Conv2d, in_channels: int | None = None,
              out_channels: int | None = None) -> nn.Conv2d:
    """A fresh Conv2d with ``conv``'s kernel, stride, padding and bias, other channel counts."""
    return nn.Conv2d(in_channels or conv.in_channels, out_channels or conv.out_channels,
                     conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                     conv.bias is not None, conv.padding_mode)


class GlobalAttention(nn.Module):
    """SAGAN-style attention (Zhang et al., 2019) from a query map to a key/value map.

    Q from ``query`` and K from ``source``: 1×1 convs to C/8; V from ``source``: 1×1 conv to
    C/2; y = V·softmax(QᵀK) over all key positions (unscaled dot product, as SAGAN), brought
    back to C channels by a 1×1 conv. ``norm``: BatchNorm after the Q, K, V convs (Feedback
    Attention); ``kv_stride`` average-pools K and V; ``chunk``: see
    :func:`.full_attention.attention` (never an (HW)² map). (N, C, H, W), (N, C, H', W') →
    (N, C, H, W).
    """

    coarse = False  # True where it attends over a coarse (bottleneck) map: its export may be dense

    def __init__(self, channels: int, norm: bool = False, kv_stride: int = 1,
                 chunk: int | None = None):
        super().__init__()
        d, c = max(1, channels // 8), max(1, channels // 2)
        self.q, self.k, self.v = (self._project(channels, n, norm) for n in (d, d, c))
        self.out = nn.Conv2d(c, channels, 1)
        self.kv_stride, self.chunk = kv_stride, chunk

    @staticmethod
    def _project(c_in: int, c_out: int, norm: bool) -> nn.Module:
        if not norm:
            return nn.Conv2d(c_in, c_out, 1)
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        n, _, h, w = query.shape
        k, v = self.k(source), self.v(source)
        if self.kv_stride > 1:
            k, v = F.avg_pool2d(k, self.kv_stride), F.avg_pool2d(v, self.kv_stride)
        y = attention(self.q(query).flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2),
                      v.flatten(2).transpose(1, 2), scale=1.0, chunk=self.chunk)
        return self.out(y.transpose(1, 2).reshape(n, -1, h, w))
