"""Feedback Attention (Tsuda, Shibuya & Hotta, 2020): two rounds; round 2 restarts from
A = scale·attention(F, O) + F, where F is the input-side feature after the first two 3×3 convs
and O the decoder's output feature of round 1 (METHODS.md §1)."""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..blocks import channel_gate
from ..encoders import DoubleConv, PlainEncoder
from ..full_attention import attention
from ..hooks import decoder_out_channels, in_channels_of
from ..registry import PluginConfigError, Range, register_plugin
from ..rounds import Feedback, RoundState, install_rounds

CONNECTIONS = ("self", "st", "add", "conv", "se", "light")
CPU_WARN_PIXELS = 256 * 256


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class AttentionConnection(nn.Module):
    """Q from ``query`` (F for source-target, O for self), K and V from O (paper Fig. 2–3).

    Q, K: 1×1 conv + BN to C/8; V: 1×1 conv + BN to C/2; softmax over keys of QᵀK (no
    scaling); the C/2 result goes back to C by a 1×1 conv (SAGAN's reading). ``kv_stride``
    average-pools K and V. (N, C, H, W), (N, C, H, W) → (N, C, H, W).
    """

    def __init__(self, channels: int, kv_stride: int = 1, chunk: int | None = None):
        super().__init__()
        d, c = max(1, channels // 8), max(1, channels // 2)
        self.q, self.k, self.v = conv_bn(channels, d), conv_bn(channels, d), conv_bn(channels, c)
        self.out = nn.Conv2d(c, channels, 1)
        self.kv_stride, self.chunk = kv_stride, chunk

    def forward(self, query: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        n, _, h, w = query.shape
        k, v = self.k(o), self.v(o)
        if self.kv_stride > 1:
            k, v = F.avg_pool2d(k, self.kv_stride), F.avg_pool2d(v, self.kv_stride)
        y = attention(self.q(query).flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2),
                      v.flatten(2).transpose(1, 2), scale=1.0, chunk=self.chunk)
        return self.out(y.transpose(1, 2).reshape(n, -1, h, w))


class SEConnection(nn.Module):
    """Squeeze-and-excitation of O (the paper's "SE block then add" ablation)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.gate = channel_gate(channels, reduction)

    def forward(self, f, o):
        return o * self.gate(o)


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
    """Keeps O from round 1 (decoder hook) and turns F into A in round 2 (F-site hook)."""

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

    def keep_output(self, decoder, inputs, output):
        if self.state.current == 0:
            self._o = output

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
        o = self._o
        if o.shape[-2:] != f.shape[-2:]:
            o = F.interpolate(o, size=f.shape[-2:], mode="bilinear", align_corners=False)
        o = self.project(o)
        if self.training and not f.is_cuda and f.shape[-2] * f.shape[-1] >= CPU_WARN_PIXELS \
                and self.connection in ("self", "st"):
            warnings.warn(
                f"Feedback Attention at {f.shape[-2]}×{f.shape[-1]} on the CPU: full-resolution "
                "attention is GPU work (about 25 s per image per step at 256²); use a GPU, "
                "smaller crops or kv_stride=4", stacklevel=2)
        return f + self.scale * self.combine(f, o)


class FeedbackStem(nn.Module):
    """Two 3×3 conv blocks at full resolution, for encoders without such a first feature."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.convs = DoubleConv(in_channels, channels)

    def feed_encoder(self, encoder, inputs):
        return (self.convs(inputs[0]),)


def _replace_first_conv(module: nn.Module, in_channels: int) -> None:
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups,
                                child.bias is not None, child.padding_mode)
                setattr(parent, name, new)
                return
    raise PluginConfigError(f"no convolution found in {type(module).__name__}")


def f_site(model: nn.Module, at: str, o_channels: int) -> tuple[nn.Module, int]:
    """The module whose output is F, and F's channels (adds a stem where the encoder has none)."""
    encoder = model.encoder
    if isinstance(encoder, PlainEncoder):
        stem = encoder.stem
    else:
        if not hasattr(encoder, "out_channels"):
            raise PluginConfigError(f"{type(encoder).__name__} is not an smp encoder")
        stem_module = FeedbackStem(in_channels_of(model), o_channels)
        model.feedback_stem = stem_module
        _replace_first_conv(encoder, o_channels)
        encoder.register_forward_pre_hook(stem_module.feed_encoder)
        stem = stem_module.convs
    # DoubleConv = (conv, BN, ReLU, conv, BN, ReLU): after conv 1 is index 2, after conv 2 is all
    return (stem[2] if at == "conv1" else stem), stem[0].out_channels


def build_feedback_attention(model, connection, lam, at, kv_stride, chunk, predict):
    o_channels = decoder_out_channels(model)
    state = RoundState()
    site, f_channels = f_site(model, at, o_channels)
    feedback = FeedbackAttention(state, f_channels, o_channels, connection, kv_stride, chunk)
    install_rounds(model, feedback, state, lam, predict)
    model.decoder.register_forward_hook(feedback.keep_output)
    site.register_forward_hook(feedback.feed)
    return model


Lam = Annotated[float, Range(0, None)]
At = Literal["conv2", "conv1"]
KVStride = Literal[1, 2, 4]
Chunk = Annotated[int, Range(1, None)] | None
Predict = Literal[1, 2]


@register_plugin("feedback_self", exclusive="rounds")
def feedback_self(model: nn.Module, lam: Lam = 0.0, at: At = "conv2", kv_stride: KVStride = 1,
                  chunk: Chunk = None, predict: Predict = 2) -> nn.Module:
    """Feedback Attention, self-attention (Q, K, V from O): the paper's best variant.

    Two rounds with shared weights; round 2 restarts from A = β·attention(O) + F (β starts at
    0). F: the first two 3×3 convs' output at full resolution (``at="conv1"``: after one conv);
    the plain encoder's first block, else an added two-conv stem. O: the decoder output,
    resized to F's size. ``lam`` adds λ·L(round 1); ``kv_stride`` pools keys/values (speed);
    ``chunk=N``: N queries at a time, recomputed in backward, instead of torch's fused kernels;
    ``predict=1`` returns round 1 (ablation).
    """
    return build_feedback_attention(model, "self", lam, at, kv_stride, chunk, predict)


@register_plugin("feedback_st", exclusive="rounds")
def feedback_st(model: nn.Module, lam: Lam = 0.0, at: At = "conv2", kv_stride: KVStride = 1,
                chunk: Chunk = None, predict: Predict = 2) -> nn.Module:
    """Feedback Attention, source-target (Q from F, K and V from O); see feedback_self."""
    return build_feedback_attention(model, "st", lam, at, kv_stride, chunk, predict)


@register_plugin("feedback_attention", exclusive="rounds")
def feedback_attention(model: nn.Module, connection: Literal[CONNECTIONS] = "self",
                       lam: Lam = 0.0, at: At = "conv2", kv_stride: KVStride = 1,
                       chunk: Chunk = None, predict: Predict = 2) -> nn.Module:
    """Feedback Attention with any connection: self | st | add | conv | se | light.

    The paper's ablations (Table 3): plain add, 1×1 conv, SE block or Light-Attention-style
    gating of O, each scaled by a learnable factor (initialised to 0) and added to F.
    """
    return build_feedback_attention(model, connection, lam, at, kv_stride, chunk, predict)
