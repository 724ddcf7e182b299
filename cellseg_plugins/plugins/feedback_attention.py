"""Feedback Attention (Tsuda, Shibuya & Hotta, 2020): two rounds; round 2 restarts from
A = scale·attention(F, O) + F, where F is the input-side feature after the first two 3×3 convs
and O the decoder's output feature of round 1 (METHODS.md §1)."""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..blocks import GlobalAttention, SqueezeExcitation, conv_like
from ..encoders import DoubleConv
from ..hooks import (EncoderInputTransform, decoder_out_channels, encoder_stage, first_conv,
                     in_channels_of, set_child, tap_head_input, transform_encoder_input,
                     transform_output)
from ..registry import PluginConfigError, Range, register_plugin
from ..rounds import Feedback, RoundState, install_rounds

CONNECTIONS = ("self", "st", "add", "conv", "se", "light")
CPU_WARN_PIXELS = 256 * 256
PAPER_F_CHANNELS = 64  # the paper's U-Net: F and O both have 64 channels


class AttentionConnection(GlobalAttention):
    """Q from ``query`` (F for source-target, O for self), K and V from O (paper Fig. 2–3).

    Q, K: 1×1 conv + BN to C/8; V: 1×1 conv + BN to C/2; softmax over keys of QᵀK (no
    scaling); the C/2 result goes back to C by a 1×1 conv (SAGAN's reading). ``kv_stride``
    average-pools K and V. (N, C, H, W), (N, C, H, W) → (N, C, H, W).
    """

    def __init__(self, channels: int, kv_stride: int = 1, chunk: int | None = None):
        super().__init__(channels, norm=True, kv_stride=kv_stride, chunk=chunk)


class SEConnection(SqueezeExcitation):
    """Squeeze-and-excitation of O (the paper's "SE block then add" ablation)."""

    def forward(self, f, o):
        return super().forward(o)


class LightConnection(nn.Module):
    """Light-Attention-style gating of O: O ⊙ σ(3×3 conv(O)) per pixel and channel.

    An approximation: the Light Attention paper's exact block is not reproduced here.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, f, o):
        return o * self.gate(o)


class FeedbackAttention(Feedback):
    """Keeps O from round 1 (head-input tap) and turns F into A in round 2 (F-site hook)."""

    def __init__(self, state: RoundState, f_channels: int, o_channels: int, connection: str,
                 kv_stride: int, chunk: int | None):
        super().__init__()
        self.state, self.connection = state, connection
        self.project = (nn.Identity() if o_channels == f_channels
                        else nn.Conv2d(o_channels, f_channels, 1))
        if connection in ("self", "st"):
            self.connect = AttentionConnection(f_channels, kv_stride, chunk)
        elif connection == "conv":
            self.connect = nn.Conv2d(f_channels, f_channels, 1)
        elif connection == "se":
            self.connect = SEConnection(f_channels)
        elif connection == "light":
            self.connect = LightConnection(f_channels)
        else:
            self.connect = None
        self.scale = nn.Parameter(torch.zeros(1))  # β (self) / α (source-target), initialised to 0
        self._o = None

    def reset(self) -> None:
        self._o = None

    def keep_output(self, head, inputs):
        """Pre-hook on the segmentation head: O is the feature entering it, in round 1."""
        if self.state.current == 0:
            self._o = inputs[0]

    def combine(self, f: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The connection's output (before scale and residual) for F and O at F's size."""
        if self.connection == "self":
            return self.connect(o, o)
        if self.connection == "st":
            return self.connect(f, o)
        if self.connection == "add":
            return o
        if self.connection == "conv":
            return self.connect(o)
        return self.connect(f, o)

    def feed(self, module, inputs, f):
        """Forward hook on the F site: F in round 1, A = scale·combine(F, O) + F in round 2."""
        if self.state.current == 0 or self._o is None:
            return None
        o = self.project(self._o)  # before resizing: a 1×1 conv commutes with bilinear resizing
        if o.shape[-2:] != f.shape[-2:]:
            o = F.interpolate(o, size=f.shape[-2:], mode="bilinear", align_corners=False)
        if self.training and not f.is_cuda and f.shape[-2] * f.shape[-1] >= CPU_WARN_PIXELS \
                and self.connection in ("self", "st") and self.connect.kv_stride == 1:
            warnings.warn(
                f"Feedback Attention at {f.shape[-2]}×{f.shape[-1]} on the CPU: full-resolution "
                "attention is GPU work (about 25 s per image per step at 256²); use a GPU, "
                "smaller crops or kv_stride=4", stacklevel=2)
        return f + self.scale * self.combine(f, o)


class FeedbackStem(EncoderInputTransform):
    """Two 3×3 conv blocks at full resolution, for encoders without such a first feature;
    (N, C_in, H, W) → (N, C, H, W), what the encoder then receives."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.convs = DoubleConv(in_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


def f_site(model: nn.Module, at: str, o_channels: int,
           stem_channels: int | None) -> tuple[nn.Module, int]:
    """The module whose output is F, and F's channels: the encoder's first block, or an added
    two-conv stem of ``stem_channels`` (default: O's channels, at most the paper's 64)."""
    stem = encoder_stage(model, 0)
    if stem is None:  # the encoder's feature 0 is the image: add the two convs in front of it
        width = stem_channels or min(o_channels, PAPER_F_CHANNELS)
        in_channels, first = in_channels_of(model), first_conv(model)
        stem = FeedbackStem(in_channels, width)
        set_child(model.encoder, first, conv_like(first, in_channels=width))
        transform_encoder_input(model, "feedback_stem", stem)
        stem = stem.convs
    elif stem_channels is not None:
        raise PluginConfigError(
            f"stem_channels={stem_channels}: this encoder has its own first block, which "
            "gives F; stem_channels applies to encoders whose first feature is the image")
    # DoubleConv = (conv, BN, ReLU, conv, BN, ReLU[, SE]): after conv 1 is index 2, else all
    return (stem[2] if at == "conv1" else stem), stem[0].out_channels


def build_feedback_attention(model, connection, lam, at, kv_stride, chunk, predict,
                             stem_channels):
    o_channels = decoder_out_channels(model)
    state = RoundState()
    site, f_channels = f_site(model, at, o_channels, stem_channels)
    feedback = FeedbackAttention(state, f_channels, o_channels, connection, kv_stride, chunk)
    install_rounds(model, feedback, state, lam, predict)
    tap_head_input(model, feedback.keep_output)
    transform_output(site, feedback.feed)
    return model


Lam = Annotated[float, Range(0, None)]
At = Literal["conv2", "conv1"]
KVStride = Literal[1, 2, 4]
Chunk = Annotated[int, Range(1, None)] | None
Predict = Literal[1, 2]
StemChannels = Annotated[int, Range(1, None)] | None


@register_plugin("feedback_self", exclusive="rounds")
def feedback_self(model: nn.Module, lam: Lam = 0.0, at: At = "conv2", kv_stride: KVStride = 1,
                  chunk: Chunk = None, predict: Predict = 2,
                  stem_channels: StemChannels = None) -> nn.Module:
    """Feedback Attention, self-attention (Q, K, V from O): the paper's best variant.

    "we use the model twice with shared weights" (§3.1); round 2 restarts from
    A = β·attention(O) + F, "where β is initialized as 0" (Eq. 5). Q, K, V: "we feed the
    feature maps of output into 1×1 convolution and batch normalization" (C/8, C/8, C/2
    channels; the C/2 → C reshape is a 1×1 conv, SAGAN's reading, the paper says no more).
    F: "we use the input feature map that was processed two times by convolution" (the plain
    encoder's first block, else an added full-resolution two-conv stem of ``stem_channels``,
    by default O's channels up to the paper's 64; ``at="conv1"``: after one conv, Table 3).
    O: the feature entering the segmentation head (a 1×1 conv to F's channels where they
    differ, then resized to F's size where the decoder output is coarser). Loss: "U-Net is
    updated by using only the gradients at the second round" (``lam=0``; ``lam`` adds
    λ·L(round 1)). ``kv_stride`` pools keys/values (speed, not
    in the paper); ``chunk=N``: N queries at a time, recomputed in backward, instead of torch's
    fused kernels. ``predict=1``: eval-mode forwards return round 1 of the normally trained
    model ("we compare the results of the outputs at the first and second rounds", Table 4).
    """
    return build_feedback_attention(model, "self", lam, at, kv_stride, chunk, predict,
                                    stem_channels)


@register_plugin("feedback_st", exclusive="rounds")
def feedback_st(model: nn.Module, lam: Lam = 0.0, at: At = "conv2", kv_stride: KVStride = 1,
                chunk: Chunk = None, predict: Predict = 2,
                stem_channels: StemChannels = None) -> nn.Module:
    """Feedback Attention, source-target (Q from F, K and V from O); see feedback_self."""
    return build_feedback_attention(model, "st", lam, at, kv_stride, chunk, predict,
                                    stem_channels)


@register_plugin("feedback_attention", exclusive="rounds")
def feedback_attention(model: nn.Module, connection: Literal[CONNECTIONS] = "self",
                       lam: Lam = 0.0, at: At = "conv2", kv_stride: KVStride = 1,
                       chunk: Chunk = None, predict: Predict = 2,
                       stem_channels: StemChannels = None) -> nn.Module:
    """Feedback Attention with any connection: self | st | add | conv | se | light.

    The paper's ablations (Table 3): plain add, 1×1 conv, SE block or Light-Attention-style
    gating of O, each scaled by a learnable factor (initialised to 0) and added to F.
    """
    return build_feedback_attention(model, connection, lam, at, kv_stride, chunk, predict,
                                    stem_channels)
