"""Global SAGAN-style self-attention on the bottleneck ("U-Net + self-attention", LFA baseline)."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import GlobalAttention
from ..hooks import has_feature_list, encoder_channels, transform_encoder_features
from ..registry import register_plugin


class SelfAttention2d(nn.Module):
    """SAGAN self-attention (Zhang et al., 2019): x + γ·attention(x, x), γ initialised to 0.

    (N, C, H, W) → (N, C, H, W); :class:`.blocks.GlobalAttention` without normalisation.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.attention = GlobalAttention(channels)
        self.attention.coarse = True  # the bottleneck's: 1/16 or 1/32 of the image's side
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.attention(x, x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:  # 0.1.0: q, k, v, out here
            rest = key[len(prefix):]
            if rest.split(".")[0] in ("q", "k", "v", "out"):
                state_dict[f"{prefix}attention.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_plugin("bottleneck_attention", supports=has_feature_list)
def bottleneck_attention(model: nn.Module) -> nn.Module:
    """Global self-attention (SAGAN) on the deepest encoder feature.

    The LFA paper's "U-net with self-attention refers to the model with self-attention at the
    bottom layer of the U-net" (§IV-B); the block is SAGAN's (the paper gives no more).
    """
    channels = encoder_channels(model)[-1]
    transform_encoder_features(model, "bottleneck_attention", {-1: SelfAttention2d(channels)})
    return model
