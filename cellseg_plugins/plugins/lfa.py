"""LFA: Localized Feature Aggregation module (Furukawa & Hotta, §III-A, Eq. 1–3)."""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..hooks import has_skips, transform_skips
from ..local_attention import local_attention
from ..registry import PluginConfigError, Range, register_plugin


class LocalFeatureAggregation(nn.Module):
    """Source-target attention in an m×m window between encoder skip P and decoder feature Q.

    Q is resized (nearest) to P's resolution. With ``query="encoder"`` (§III-A's formal
    definition): W = softmax_window(f_q(P)ᵀ f_k(Q)), Y = Σ W f_v(Q) (Eq. 1–2); with
    ``query="decoder"`` (the text under Fig. 2) the roles swap. Output (Eq. 3): Y + P
    (``residual="encoder"``), Y + Q (``"decoder"``, Q projected to P's channels if needed) or Y.
    (N, C_P, H, W), (N, C_Q, h, w) → (N, C_P, H, W): it replaces the skip. With
    ``normalise_decoder`` Q passes a BatchNorm first (not in the paper, whose Q always leaves a
    convolution + BatchNorm block; see ``lfa``'s ``decoder_norm``).
    """

    onnx_by_trace = True  # its m² window slices are slow for the torch.export-based exporter

    def __init__(self, skip_channels: int, decoder_channels: int, m: int, query: str,
                 residual: str, reduction: int, normalise_decoder: bool = False):
        super().__init__()
        self.m, self.query, self.residual = m, query, residual
        self.norm = nn.BatchNorm2d(decoder_channels) if normalise_decoder else nn.Identity()
        d = max(1, skip_channels // reduction)
        q_in, kv_in = ((skip_channels, decoder_channels) if query == "encoder"
                       else (decoder_channels, skip_channels))
        self.f_q = nn.Conv2d(q_in, d, 1)
        self.f_k = nn.Conv2d(kv_in, d, 1)
        self.f_v = nn.Conv2d(kv_in, skip_channels, 1)
        if residual == "decoder" and decoder_channels != skip_channels:
            self.f_r = nn.Conv2d(decoder_channels, skip_channels, 1)
        else:
            self.f_r = nn.Identity()

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        decoder = self.norm(decoder)
        if decoder.shape[-2:] != skip.shape[-2:]:
            decoder = F.interpolate(decoder, size=skip.shape[-2:], mode="nearest")
        source, target = (skip, decoder) if self.query == "encoder" else (decoder, skip)
        y = local_attention(self.f_q(source), self.f_k(target), self.f_v(target), self.m)
        if self.residual == "encoder":
            return y + skip
        if self.residual == "decoder":
            return y + self.f_r(decoder)
        return y


# decoder_norm came after fpn/linknet + lfa checkpoints were saved without its BatchNorm
@register_plugin("lfa", supports=has_skips,
                 added_params={"decoder_norm": ("none", r"\.lfa\.transform\.norm\.")})
def lfa(
    model: nn.Module,
    m: Annotated[int, Range(1, 31)] = 7,
    query: Literal["encoder", "decoder"] = "encoder",
    residual: Literal["encoder", "decoder", "none"] = "encoder",
    stages: Sequence[int] | None = None,
    reduction: Annotated[int, Range(1, 1024)] = 8,
    fusion: Literal["auto", "replace", "concat"] = "auto",
    decoder_norm: Literal["auto", "batch", "none"] = "auto",
) -> nn.Module:
    """Localized Feature Aggregation: m×m local attention between encoder skip and decoder.

    Inserted at every skip connection before the decoder block's convolutions ("These
    processes are done before the convolutional layer in each decoder layer", §III-B);
    ``stages`` picks skip levels by encoder feature index, stride 2**stage (classic_unet's
    full-resolution skip is 0, smp encoders' first is 1 at stride 2; default all). ``query``
    says which side gives the query (the paper is ambiguous; default §III-A's encoder),
    ``residual`` which feature is added back (the paper's Table 4: encoder is best).
    ``reduction``: query/key channels = skip channels / reduction (not in the paper).
    ``fusion``: the paper "used source-target-attention between feature maps instead of
    concatenation" (§II-A), so with ``replace`` the decoder's convolution receives Y + P alone;
    ``concat`` keeps the arch's own fusion of the decoder feature with Y + P; ``auto``
    (default) replaces where the decoder block can take it (classic_unet) and keeps the arch's
    fusion elsewhere (smp's blocks concatenate or add inline).
    ``decoder_norm``: in the paper's U-Net the decoder feature Q leaves a convolution +
    BatchNorm block before it meets the skip; in FPN's top-down path it is a sum of plain
    convolutions, and Y + P returns into it through one more (Q → f_v → skip_conv → next Q),
    so Q can grow level after level: on ssTEM it reached 6·10⁵ and the attention logits 10⁹,
    and training diverged (Linknet adds Y + P back into Q as it is: the same loop).
    ``batch`` puts a BatchNorm on Q before f_k, f_v (and f_r), ``none`` never does, ``auto``
    (default) does where the arch returns the skip into Q unnormalised (FPN, Linknet, and
    decoders built with ``decoder_use_norm=False``) and nowhere else, so the papers' U-Net
    and smp's U-Nets are unchanged.
    """
    if m % 2 != 1:
        raise PluginConfigError(f"m={m}: the window size must be odd (3, 5, 7, ...)")
    wanted, skips = None if stages is None else set(stages), []

    def make(site):
        skips.append(site.stage)
        if wanted is not None and site.stage not in wanted:
            return None
        normalise = decoder_norm == "batch" or (decoder_norm == "auto"
                                                and not site.decoder_normalised)
        return LocalFeatureAggregation(site.skip_channels, site.decoder_channels, m, query,
                                       residual, reduction, normalise)

    sites = transform_skips(model, "lfa", make)
    missing = sorted(set(wanted or ()) - set(skips))
    if missing:
        raise PluginConfigError(
            f"stages={list(stages)}: {', '.join(map(str, missing))} matches no skip of this "
            f"model; its skips are at stages {', '.join(map(str, sorted(skips)))} (the encoder "
            "feature index: stride 2**stage)")
    if fusion == "replace" and any(site.replace is None for site in sites):
        raise PluginConfigError(
            f"fusion='replace' needs decoder blocks with a separate fusion step (classic_unet); "
            f"{type(model).__name__} fuses inline: use fusion='concat'")
    if fusion != "concat":
        for site in sites:
            if site.replace is not None:
                site.replace()
    return model
