"""Attention U-Net's additive attention gate on each skip (Oktay et al., 2018; LFA baseline)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..hooks import has_skips, transform_skips
from ..registry import register_plugin


class AttentionGate(nn.Module):
    """α = σ(ψ(ReLU(W_x x + W_g g))), output x·α; x the skip, g the decoder (gating) feature.

    g is resized (nearest) to x's resolution. (N, C_x, H, W), (N, C_g, h, w) → (N, C_x, H, W).
    """

    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        inter = max(1, skip_channels // 2)
        self.w_x = nn.Sequential(nn.Conv2d(skip_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.w_g = nn.Sequential(nn.Conv2d(gate_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if gate.shape[-2:] != skip.shape[-2:]:
            gate = F.interpolate(gate, size=skip.shape[-2:], mode="nearest")
        return skip * self.psi(F.relu(self.w_x(skip) + self.w_g(gate)))


@register_plugin("attention_gate", supports=has_skips)
def attention_gate(model: nn.Module) -> nn.Module:
    """Attention U-Net: an additive attention gate on every encoder skip."""
    transform_skips(model, "attention_gate",
                    lambda site: AttentionGate(site.skip_channels, site.decoder_channels))
    return model
