"""The papers' U-Net (Ronneberger et al., 2015, as used by all four papers), arch ``classic_unet``.

Encoder: the plain double-conv encoder (:mod:`.encoders`), max-pooling between levels.
Decoder block: 2×2 transposed convolution halving the channels ("deconvolution is used for
upsampling", Feedback U-Net §2.1), concatenation with the encoder skip, two 3×3 convs.
Head: a 1×1 convolution to the classes. ``width=8`` is the Feedback U-Net / FA network
("The number of filters ... is set to 8, 16, 32, 64 and 128 from the top to bottom"),
``width=64`` the original U-Net of the LFA paper, ``width=32, se=True`` the FREM paper's
"standard U-Net with SE block" (512 bottleneck channels).

Built like an smp model (``encoder``, ``decoder``, ``segmentation_head``), so every hook point
and plugin works on it. The skip fusion is an explicit module (:class:`SkipFusion`), so a plugin
can replace the concatenation (LFA's "instead of concatenation").
"""

from __future__ import annotations

from typing import Annotated

import torch
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base import initialization as smp_init
from torch import nn

from .encoders import DoubleConv, PlainEncoder
from .registry import Range, register_arch


class SkipFusion(nn.Module):
    """Where the upsampled decoder feature meets the encoder skip.

    ``mode="concat"`` (U-Net): cat([decoder, skip]); ``mode="replace"``: the skip alone, which a
    skip plugin has by then turned into its fusion of both (LFA's Y + P).
    (N, C_d, H, W), (N, C_s, H, W) → (N, C_d + C_s or C_s, H, W).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mode = "concat"

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.mode == "replace":
            return skip
        return torch.cat([decoder, skip], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ClassicDecoderBlock(nn.Module):
    """up-conv 2×2 (C_in → C_out) → fuse with the skip (C_out) → DoubleConv → C_out channels.

    (N, C_in, H, W), (N, C_out, 2H, 2W) → (N, C_out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, se_reduction: int | None = None):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.fuse = SkipFusion()
        self.convs = DoubleConv(2 * out_channels, out_channels, se_reduction)

    def replace_concatenation(self) -> None:
        """Let the skip (as a plugin transformed it) replace the concatenation."""
        old = self.convs[0]
        self.fuse.mode = "replace"
        self.convs[0] = nn.Conv2d(old.out_channels, old.out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(self.fuse(self.up(x), skip))


class ClassicUnetDecoder(nn.Module):
    """Decoder blocks from the bottleneck up; features (stride 1 … 2^depth) → (N, width, H, W)."""

    def __init__(self, encoder_channels: list[int], se_reduction: int | None = None):
        super().__init__()
        chans = list(encoder_channels)
        self.blocks = nn.ModuleList(
            ClassicDecoderBlock(chans[i + 1], chans[i], se_reduction)
            for i in reversed(range(len(chans) - 1)))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(x, skip)
        return x


class ClassicUnet(SegmentationModel):
    """The papers' U-Net; (N, in_channels, H, W) → (N, classes, H, W), H and W divisible by
    2^depth."""

    def __init__(self, in_channels: int = 1, classes: int = 5, width: int = 8, depth: int = 4,
                 se_reduction: int | None = None):
        super().__init__()
        self.encoder = PlainEncoder(width, depth, output_stride=32, se_reduction=se_reduction)
        self.encoder.set_in_channels(in_channels)
        self.decoder = ClassicUnetDecoder(self.encoder.out_channels, se_reduction)
        self.segmentation_head = nn.Sequential(nn.Conv2d(width, classes, 1))
        self.classification_head = None
        smp_init.initialize_decoder(self.decoder)
        smp_init.initialize_head(self.segmentation_head)


@register_arch("classic_unet", model_class=ClassicUnet, input="multiples of 2^depth (16)",
               skips=True, feature_list=True)
def classic_unet(in_channels: int, classes: int,
                 width: Annotated[int, Range(1, 256)] = 8,
                 depth: Annotated[int, Range(1, 5)] = 4,
                 se: bool = False,
                 se_reduction: Annotated[int, Range(1, 1024)] = 16) -> nn.Module:
    """The papers' U-Net: double convs, max-pool, transposed-conv upsampling, 1×1 classifier.

    ``width`` channels at the top, doubled per level over ``depth`` levels (8 → 8…128, the
    Feedback U-Net / FA network; 64 → the original U-Net of the LFA paper). ``se=True`` puts a
    squeeze-and-excitation block after every double conv, encoder and decoder: the FREM
    paper's "standard U-Net with SE block" (its figure, not its text, places the blocks;
    ``se_reduction`` is not given in the paper).
    """
    return ClassicUnet(in_channels, classes, width, depth, se_reduction if se else None)
