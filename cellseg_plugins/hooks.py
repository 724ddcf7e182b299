"""Hook points inside smp models, shared by all plugins.

- encoder stages / bottleneck: :func:`transform_encoder_features` (forward hook on ``encoder``);
- decoder output: :func:`transform_decoder_output` (forward hook on ``decoder``);
- skip fusion: :func:`transform_skips` replaces the encoder skip at every place where an
  architecture fuses (decoder feature, skip), before its own fusion; where the arch's fusion is
  an explicit module (classic_unet), a site can also drop the concatenation (``site.replace``);
- head input: :func:`tap_head_input` sees the feature entering the segmentation head, after
  every decoder-output transform, whatever order plugins were applied in;
- places inside the network: :func:`first_conv` (the convolution that sees the input),
  :func:`encoder_stage` (the module computing encoder feature i), :func:`decoder_block`
  (the k-th decoder block from the output), :func:`set_child` (swap a submodule),
  :func:`transform_output` (change what one of them returns), :func:`transform_encoder_input`
  (change what the encoder receives: an added stem).

Hooks are bound methods of small adapter modules that live inside the model, so
``copy.deepcopy`` and pickling keep them pointing at the copied modules.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from segmentation_models_pytorch.base import modules as smp_modules
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from segmentation_models_pytorch.decoders.fpn.decoder import FPNBlock
from segmentation_models_pytorch.decoders.linknet.decoder import DecoderBlock as LinknetBlock
from segmentation_models_pytorch.decoders.manet.decoder import DecoderBlock as MAnetBlock
from segmentation_models_pytorch.decoders.manet.decoder import MFABBlock
from segmentation_models_pytorch.decoders.pan.decoder import GAUBlock
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
from segmentation_models_pytorch.decoders.unetplusplus.decoder import DecoderBlock as UnetPPBlock
from segmentation_models_pytorch.decoders.upernet.decoder import FPNLateralBlock
from torch import nn

from .classic_unet import ClassicDecoderBlock
from .encoders import PlainEncoder
from .registry import PluginConfigError

# (block class, its forward argument holding the decoder feature, the one holding the skip)
SKIP_CALLS = (
    (UnetDecoderBlock, "feature_map", "skip_connection"),
    (UnetPPBlock, "x", "skip"),
    (MFABBlock, "x", "skip"),
    (MAnetBlock, "x", "skip"),
    (LinknetBlock, "x", "skip"),
    (FPNBlock, "x", "skip"),
    (GAUBlock, "y", "x"),
    (FPNLateralBlock, "state_feature", "lateral_feature"),
)
# blocks that add the skip back into the decoder feature with no normalisation on the way,
# so the next block's decoder feature carries this skip's transform as it is: FPN's top-down
# path (p4 = up(p5) + conv1x1(c4), ...) and Linknet's (x = block(x) + skip)
UNNORMALISED_DECODER = (FPNBlock, LinknetBlock)
# normalisation layers a decoder block may hold (smp's use_norm: batchnorm, instancenorm,
# layernorm, inplace); smp's decoder_use_norm=False leaves none in it
NORM_LAYERS = tuple(c for c in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                smp_modules.InPlaceABN) if c is not None)


def normalises_decoder(block: nn.Module) -> bool:
    """False where ``block`` returns its skip into the decoder feature with no normalisation
    on the way: FPN's and Linknet's blocks (they add it after their last norm), and any
    block built with ``decoder_use_norm=False``."""
    return (type(block) not in UNNORMALISED_DECODER
            and any(isinstance(m, NORM_LAYERS) for m in block.modules()))


def has_skips(arch) -> bool:
    """``supports`` predicate of skip plugins: the arch's table row says its skips are
    reachable (archs.SMP_ARCHS, or ``register_arch(..., skips=True)``)."""
    return bool(arch.extra.get("skips"))


def has_feature_list(arch) -> bool:
    """``supports`` predicate of bottleneck / stage plugins: the encoder returns a feature
    list."""
    return bool(arch.extra.get("feature_list"))


def unique_child_name(parent: nn.Module, name: str) -> str:
    out, k = name, 1
    while hasattr(parent, out):
        k += 1
        out = f"{name}_{k}"
    return out


# ---------------------------------------------------------------- model facts


def in_channels_of(model: nn.Module) -> int:
    """The model's input channels: those of its first convolution, remembered on first use
    (plugins such as Feedback Attention later change what the encoder's first conv takes)."""
    if "cellseg_in_channels" not in model.__dict__:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise PluginConfigError(f"cannot find a Conv2d in {type(model).__name__}")
        model.cellseg_in_channels = first.in_channels
    return model.cellseg_in_channels


def classes_of(model: nn.Module) -> int:
    """Output classes: those of the segmentation head's last convolution."""
    convs = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def decoder_out_channels(model: nn.Module) -> int:
    """Channels of the decoder's output: those entering the segmentation head."""
    convs = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    return convs[0].in_channels


def encoder_channels(model: nn.Module) -> list[int]:
    return list(model.encoder.out_channels)


def encoder_returns_input(model: nn.Module) -> bool:
    """Whether encoder feature 0 is the input itself (smp's CNN encoders), not a computed
    feature (plain encoders' stem, DPT's first ViT feature); one probe pass."""
    return probe_output(model, model.encoder,
                        lambda inputs, out: unpack_features(out)[0][0] is inputs[0])


def encoder_strides(model: nn.Module) -> list[int]:
    """Each encoder feature's stride (input side / feature side; one probe pass): smp's CNN
    encoders 1, 2, 4, …; DPT's ViT the patch size for every feature."""
    sides = probe_output(model, model.encoder,
                         lambda inputs, out: [f.shape[-1] for f in unpack_features(out)[0]])
    return [probe_size(model) // side if side else 0 for side in sides]


def probe_size(model: nn.Module) -> int:
    """A square input size the model accepts: a ViT's fixed image size, else 128 (the smallest
    every smp arch takes; PAN needs 128)."""
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if getattr(m, "strict_img_size", False) and size:
            return int(size[0])
    return 128


@torch.no_grad()
def run_probe(model: nn.Module, size: int | None = None) -> None:
    """One eval-mode forward pass on zeros, to let temporary hooks record shapes."""
    size = size or probe_size(model)
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels_of(model), size, size,
                          device=next(model.parameters()).device))
    finally:
        model.train(was_training)


def decoder_reads_input(model: nn.Module) -> bool:
    """Whether the decoder reads the model's input itself as a skip (smp's encoders return it
    as feature 0; FPN at encoder_depth=3 uses it): one probe pass with NaN in its place."""
    def poison(encoder, inputs, features):
        if isinstance(features, (list, tuple)) and len(features) and features[0] is inputs[0]:
            return [torch.full_like(features[0], float("nan")), *features[1:]]
        return None

    handle = model.encoder.register_forward_hook(poison)
    try:
        return bool(torch.isnan(head_output(model)).any())
    finally:
        handle.remove()


def probe_output(model: nn.Module, module: nn.Module, read: Callable, last: bool = False):
    """``read(inputs, output)`` of ``module`` inside ``model`` on one probe pass: of its first
    call, or with ``last`` its last (a module that runs once a round)."""
    seen = []
    handle = module.register_forward_hook(lambda m, inputs, out: seen.append(read(inputs, out)))
    try:
        run_probe(model)
    finally:
        handle.remove()
    return seen[-1] if last else seen[0]


def head_output(model: nn.Module) -> torch.Tensor:
    """The segmentation head's output for one probe pass (probe_size² zeros; the last
    round's)."""
    return probe_output(model, model.segmentation_head, lambda inputs, out: out, last=True)


def output_channels(model: nn.Module, module: nn.Module) -> int:
    """Channels of ``module``'s output inside ``model`` (one probe pass)."""
    return probe_output(model, module, lambda inputs, out: out.shape[1])


# ---------------------------------------------------------------- encoder features


class EncoderFeatureTransform(nn.Module):
    """Applies ``transforms[i]`` to encoder feature i: (N, C_i, H_i, W_i) → same shape."""

    def __init__(self, transforms: dict[int, nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleDict({str(i): t for i, t in transforms.items()})

    def hook(self, encoder, inputs, output):
        features, repack = unpack_features(output)
        for key, transform in self.transforms.items():
            features[int(key)] = transform(features[int(key)])
        return repack(features)


def unpack_features(output) -> tuple[list[torch.Tensor], Callable[[list], object]]:
    """The encoder's features and how to return changed ones in its own form: smp's encoders
    return a feature list; its ViT encoder (DPT) a pair (features, prefix tokens), the tokens
    passed on to the decoder as they are."""
    if (isinstance(output, tuple) and len(output) == 2
            and isinstance(output[0], (list, tuple))):
        tokens = output[1]
        return list(output[0]), lambda features: (features, tokens)
    return list(output), lambda features: features


def transform_encoder_features(model: nn.Module, name: str,
                               transforms: dict[int, nn.Module]) -> EncoderFeatureTransform:
    """Insert ``transforms`` (feature index → module; -1 = bottleneck) after the encoder."""
    if not isinstance(getattr(model, "encoder", None), nn.Module) or not hasattr(
            model.encoder, "out_channels"):
        raise PluginConfigError(f"{type(model).__name__} has no smp encoder to hook into")
    n = len(model.encoder.out_channels)
    adapter = EncoderFeatureTransform({i % n: t for i, t in transforms.items()})
    model.add_module(unique_child_name(model, name), adapter)
    model.encoder.register_forward_hook(adapter.hook)
    return adapter


# ---------------------------------------------------------------- decoder output


class OutputTransform(nn.Module):
    """Applies ``transform`` to the decoder's output (the feature entering the head)."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform

    def hook(self, decoder, inputs, output):
        return self.transform(output)


def transform_decoder_output(model: nn.Module, name: str, transform: nn.Module) -> OutputTransform:
    adapter = OutputTransform(transform)
    model.add_module(unique_child_name(model, name), adapter)
    model.decoder.register_forward_hook(adapter.hook)
    return adapter


# ---------------------------------------------------------------- skip fusion


@dataclass
class SkipSite:
    """One place where a decoder feature meets an encoder skip.

    ``stage`` is the encoder feature index of the skip (its stride is 2**stage). ``replace``,
    where the arch allows it, makes the (transformed) skip replace the arch's concatenation.
    ``decoder_normalised`` is False where the skip is added back into the decoder feature
    with no normalisation on the way (:func:`normalises_decoder`): a transform that feeds the
    decoder feature into the skip there multiplies it level after level.
    """

    owner: nn.Module
    attach: Callable[[Callable], list]
    decoder_channels: int = 0
    skip_channels: int = 0
    stage: int = -1
    replace: Callable[[], None] | None = None
    decoder_normalised: bool = True


class CallSkipTransform(nn.Module):
    """Rewrites the skip argument of a fusion block's call: skip ← transform(decoder, skip)."""

    def __init__(self, transform: Callable, arg_names: list[str], decoder_arg: str, skip_arg: str):
        super().__init__()
        self.transform = transform
        self.arg_names, self.decoder_arg, self.skip_arg = arg_names, decoder_arg, skip_arg

    def hook(self, block, args, kwargs):
        values = dict(zip(self.arg_names, args), **kwargs)
        skip = values.get(self.skip_arg)
        if skip is None or skip.shape[1] == 0:
            return None
        values[self.skip_arg] = self.transform(values[self.decoder_arg], skip)
        return (), values


class DeepLabSkipTransform(nn.Module):
    """DeepLabV3+ fuses inline: keep ``decoder.up``'s output, rewrite ``decoder.block1``'s."""

    def __init__(self, transform: Callable):
        super().__init__()
        self.transform = transform
        self._decoder_feature = None

    def keep(self, module, inputs, output):
        self._decoder_feature = output

    def hook(self, module, inputs, output):
        decoder_feature, self._decoder_feature = self._decoder_feature, None
        return self.transform(decoder_feature, output)


def _call_attacher(block: nn.Module, decoder_arg: str, skip_arg: str):
    names = list(inspect.signature(block.forward).parameters)

    def attach(transform):
        adapter = CallSkipTransform(transform, names, decoder_arg, skip_arg)
        return adapter, [block.register_forward_pre_hook(adapter.hook, with_kwargs=True)]
    return attach


def _deeplab_attacher(decoder: DeepLabV3PlusDecoder):
    def attach(transform):
        adapter = DeepLabSkipTransform(transform)
        return adapter, [decoder.up.register_forward_hook(adapter.keep),
                         decoder.block1.register_forward_hook(adapter.hook)]
    return attach


def skip_sites(model: nn.Module) -> list[SkipSite]:
    """All skip-fusion sites of ``model`` with their channel counts and stage (one probe pass).

    Sites whose skip is absent or has 0 channels (transformer placeholders) are left out.
    """
    sites = []
    for module in model.decoder.modules():
        if isinstance(module, DeepLabV3PlusDecoder):
            sites.append(SkipSite(module, _deeplab_attacher(module)))
        if isinstance(module, ClassicDecoderBlock):  # the upsampled feature meets the skip
            sites.append(SkipSite(module.fuse, _call_attacher(module.fuse, "decoder", "skip"),
                                  replace=module.replace_concatenation))
        for cls, decoder_arg, skip_arg in SKIP_CALLS:
            if type(module) is cls:
                sites.append(SkipSite(module, _call_attacher(module, decoder_arg, skip_arg),
                                      decoder_normalised=normalises_decoder(module)))
    handles = []
    size = probe_size(model)
    for site in sites:
        def record(decoder_feature, skip, site=site):
            site.decoder_channels = decoder_feature.shape[1]
            site.skip_channels = skip.shape[1]
            site.stage = int(round(math.log2(size / skip.shape[-2])))
            return skip
        handles += site.attach(record)[1]
    try:
        run_probe(model, size)
    finally:
        for h in handles:
            h.remove()
    return [s for s in sites if s.stage >= 0 and s.skip_channels > 0]


def transform_skips(model: nn.Module, name: str,
                    make: Callable[[SkipSite], nn.Module | None]) -> list[SkipSite]:
    """Install ``make(site)`` (a module (decoder, skip) → new skip) at every skip site.

    ``make`` may return None to leave a site alone. Returns the sites that got a module.
    Raises PluginConfigError for architectures without encoder→decoder skips.
    """
    sites = skip_sites(model)
    if not sites:
        raise PluginConfigError(
            f"{type(model).__name__} has no encoder→decoder skip connections; "
            "a skip plugin needs an arch whose encoder skips meet the decoder "
            "('cellseg list lfa' shows them)")
    used = []
    for site in sites:
        transform = make(site)
        if transform is None:
            continue
        adapter, _ = site.attach(transform)
        site.owner.add_module(unique_child_name(site.owner, name), adapter)
        used.append(site)
    return used


# ---------------------------------------------------------------- places inside the network


def tap_head_input(model: nn.Module, hook: Callable):
    """Call ``hook(head, (feature,))`` with the feature entering the segmentation head, every
    forward. ``hook`` should be a bound method of a module inside ``model`` (deepcopy rebinds
    it to the copy)."""
    return model.segmentation_head.register_forward_pre_hook(hook)


def set_child(model: nn.Module, target: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``target`` sits inside ``model``."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, new)
                return
    raise PluginConfigError(f"{type(target).__name__} is not inside {type(model).__name__}")


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The convolution that sees the model's input: the first one a probe pass runs."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, args: order.append(m))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run_probe(model)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise PluginConfigError(f"cannot find a Conv2d in {type(model).__name__}")
    return order[0]


def encoder_stage(model: nn.Module, index: int) -> nn.Module | None:
    """The module whose output is encoder feature ``index`` (plain encoders), else None."""
    encoder = model.encoder
    if not isinstance(encoder, PlainEncoder):
        return None
    return encoder.stem if index == 0 else encoder.stages[index - 1]


def decoder_block(model: nn.Module, k: int) -> nn.Module | None:
    """The k-th decoder block counted from the output (k = 1: the last), or None where the
    decoder keeps no list of blocks (fpn, pan, deeplab, ...)."""
    blocks = getattr(model.decoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) < k:
        return None
    return blocks[-k]


def transform_output(module: nn.Module, hook: Callable):
    """After ``module`` (a stage, a decoder block, a convolution block), ``hook(module, inputs,
    output)`` may return a new output (None keeps it). ``hook`` should be a bound method of a
    module inside the model, so that deepcopy rebinds it to the copy."""
    return module.register_forward_hook(hook)


class EncoderInputTransform(nn.Module):
    """Base of modules that change what the encoder receives: ``forward(image) → input``.

    The encoder's feature 0 stays the image: smp's encoders return their input there, and some
    decoders read it as a skip (FPN at encoder_depth=3)."""

    def encoder_pre_hook(self, encoder, inputs):
        self._image = inputs[0]
        return (self(inputs[0]),) + tuple(inputs[1:])

    def encoder_hook(self, encoder, inputs, features):
        image, self._image = self._image, None
        if isinstance(features, (list, tuple)) and len(features) and features[0] is inputs[0]:
            return [image, *features[1:]]
        return None


def transform_encoder_input(model: nn.Module, name: str, module: EncoderInputTransform) -> None:
    """Run ``module`` on the model's input before the encoder; it lives at ``model.<name>``."""
    model.add_module(name, module)
    model.encoder.register_forward_pre_hook(module.encoder_pre_hook)
    model.encoder.register_forward_hook(module.encoder_hook)
