"""Every smp architecture, registered under its lower-case name with offline-safe defaults.

Parameters pass through to the smp class; ``encoder`` is smp's ``encoder_name`` and
``encoder_weights`` defaults to None (no download). ``encoder_weights`` may name smp's hub weights
("imagenet", …), which need a network, or a local weights file (.pth/.pt/.safetensors) holding
an encoder state dict. ``unet`` with a ``plain*`` encoder builds the classic U-Net: depth 4,
mirrored decoder widths and the full-resolution top skip.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os
import re
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import timm
import torch
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from torch import nn

from .encoders import PLAIN_ENCODERS, is_plain
from .registry import Param, PluginConfigError, register_arch
from .registry.schema import params_from_signature

@dataclass(frozen=True)
class ArchInfo:
    """One architecture, everything cellseg knows of it in one row.

    ``input``: the input sides it takes with its default encoder (cellseg_plugins.input_rules
    finds them for any built model; a test checks this table against it). ``skips``: encoder
    skips meet the decoder at blocks :mod:`.hooks` can reach (skip plugins). ``feature_list``:
    the encoder returns a list of features, or DPT's (features, prefix tokens) pair
    (bottleneck and stage plugins).
    """

    model_class: type
    description: str
    input: str
    skips: bool = True
    feature_list: bool = True


SMP_ARCHS: dict[str, ArchInfo] = {
    "unet": ArchInfo(smp.Unet, "U-Net: decoder blocks concatenate upsampled features with "
                     "encoder skips", "any size"),
    "unetplusplus": ArchInfo(smp.UnetPlusPlus, "U-Net++: nested dense skip pathways",
                             "multiples of 32"),
    "manet": ArchInfo(smp.MAnet, "MA-Net: multi-scale attention (position + multi-scale fusion "
                      "blocks)", "multiples of 32"),
    "linknet": ArchInfo(smp.Linknet, "LinkNet: light decoder, skips fused by addition",
                        "multiples of 32"),
    "fpn": ArchInfo(smp.FPN, "Feature Pyramid Network decoder (output at 1/4, upsampled)",
                    "multiples of 32"),
    "pspnet": ArchInfo(smp.PSPNet, "PSPNet: pyramid pooling on the deepest feature, no skips",
                       "multiples of 8", skips=False),
    "deeplabv3": ArchInfo(smp.DeepLabV3, "DeepLabV3: atrous spatial pyramid pooling, no skips",
                          "multiples of 8", skips=False),
    "deeplabv3plus": ArchInfo(smp.DeepLabV3Plus, "DeepLabV3+: ASPP plus one high-resolution "
                              "skip", "multiples of 16"),
    "pan": ArchInfo(smp.PAN, "Pyramid Attention Network: feature pyramid attention + global "
                    "attention upsample", "multiples of 16, at least 128"),
    "upernet": ArchInfo(smp.UPerNet, "UPerNet: pyramid pooling + FPN lateral fusion",
                        "multiples of 32"),
    "segformer": ArchInfo(smp.Segformer, "SegFormer decoder: all-MLP multi-scale fusion",
                          "multiples of 32", skips=False),
    "dpt": ArchInfo(smp.DPT, "Dense Prediction Transformer: ViT encoder (timm) with "
                    "reassemble/fusion decoder", "exactly the ViT's image size (img_size)",
                    skips=False),
}

HIDDEN = ("in_channels", "classes", "activation", "aux_params")
# Parameters smp forwards to a timm encoder through **kwargs; None = timm's default.
TIMM_PARAMS = {"dpt": (Param("img_size", int | None, None),)}
WEIGHT_FILE = re.compile(r".*\.(pth|pt|bin|safetensors)$")
# smp's FPN and PSPNet upsample their output by a fixed factor that fits only their default
# encoder_depth (5 and 3): at another depth the output is 2×, 4×, … or ½, ¼ of the input's size.
# Their ``upsampling`` defaults to None here: the factor that fits the depth, as smp's own
# DeepLabV3 does for its output stride.
DEPTH_UPSAMPLING = {"fpn": lambda depth: 2 ** (depth - 3), "pspnet": lambda depth: 2 ** depth}


def arch_params(name: str, cls: type) -> tuple[Param, ...]:
    """The smp class's keyword parameters, ``encoder_name`` spelled ``encoder``, no weights."""
    out = []
    for p in params_from_signature(cls.__init__, skip=HIDDEN):
        if p.name == "encoder_name":
            p = Param("encoder", p.annotation, p.default)
        elif p.name == "encoder_weights":  # smp's names, True for timm ('tu-') encoders, a file
            p = Param(p.name, str | bool | None, None)
        elif p.name == "upsampling" and name in DEPTH_UPSAMPLING:
            p = Param(p.name, p.annotation | None, None)
        out.append(p)
    return tuple(out) + TIMM_PARAMS.get(name, ())


def check_encoder(name: str) -> None:
    """Raise a one-line error for an encoder neither smp nor timm knows."""
    if name.startswith("tu-"):
        if not timm.is_model(name[3:].split(".")[0]):
            close = difflib.get_close_matches(name[3:], timm.list_models(), n=3)
            hint = f"; did you mean {', '.join('tu-' + c for c in close)}?" if close else ""
            raise PluginConfigError(f"unknown timm encoder {name!r}{hint}")
        return
    if name not in smp_encoders:
        close = difflib.get_close_matches(name, list(smp_encoders), n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise PluginConfigError(f"unknown encoder {name!r}; {hint}"
                                "'cellseg list --kind encoder' lists them; 'tu-<timm name>' uses timm")


def decoder_norm(use_norm):
    """smp's ``decoder_use_norm`` as smp 0.6 can build it: ``'instancenorm'`` with affine
    weights, as its batchnorm and layernorm have (smp builds ``nn.InstanceNorm2d`` without
    them, then its own decoder initializer fails filling the missing weight)."""
    if isinstance(use_norm, str) and use_norm.lower() == "instancenorm":
        return {"type": "instancenorm", "affine": True}
    return use_norm


def build_smp(cls: type, in_channels: int, classes: int, encoder: str = "resnet34",
              encoder_weights: str | None = None, **params) -> nn.Module:
    """Build ``cls`` with smp; a local weights file is loaded into the encoder after building.
    FPN's and PSPNet's ``upsampling=None``: the factor that gives outputs of the input's size."""
    check_encoder(encoder)
    fit = next((f for name, f in DEPTH_UPSAMPLING.items() if SMP_ARCHS[name].model_class is cls),
               None)
    if fit is not None and params.get("upsampling") is None:
        depth = params.get("encoder_depth", inspect.signature(cls).parameters["encoder_depth"].default)
        params["upsampling"] = fit(depth)
    local = encoder_weights if isinstance(encoder_weights, str) and (
        os.path.isfile(encoder_weights) or WEIGHT_FILE.match(encoder_weights)) else None
    hub = None if local else encoder_weights
    if params.get("img_size", 0) is None:
        del params["img_size"]
    if "decoder_use_norm" in params:
        params["decoder_use_norm"] = decoder_norm(params["decoder_use_norm"])
    offline = hub is not None and not hub_reachable()
    try:
        with hub_offline(offline):
            model = cls(encoder_name=encoder, encoder_weights=hub, in_channels=in_channels,
                        classes=classes, **params)
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
        raise PluginConfigError(" ".join(str(e).split())) from None
    except (AttributeError, IndexError, ZeroDivisionError) as e:  # smp failed on the values
        raise PluginConfigError(f"smp.{cls.__name__} could not be built with {params} "
                                f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    except Exception as e:  # network / hub errors while fetching pretrained weights
        if hub is None:
            raise
        why = ("offline: the hub is unreachable and the weights are not cached" if offline
               else f"{type(e).__name__}; offline?")
        raise PluginConfigError(
            f"could not fetch encoder_weights={hub!r} for encoder {encoder!r} ({why}); use "
            f"encoder_weights=None, or a local file: encoder_weights='/path/to/{encoder}.pth'"
        ) from None
    if local:
        load_encoder_weights(model, local)
    return model


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the weights hub (HuggingFace, or $HF_ENDPOINT) answers a TCP connect in time."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline(offline: bool):
    """While building: cached weights only, no retries, when the hub is unreachable."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_encoder_weights(model: nn.Module, path: str) -> None:
    """Load an encoder state dict from ``path`` (torch or safetensors) into ``model.encoder``."""
    if not os.path.isfile(path):
        raise PluginConfigError(f"encoder_weights file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state)
    except Exception as e:
        raise PluginConfigError(
            f"encoder_weights file {path!r} does not fit encoder: {' '.join(str(e).split())[:300]}"
        ) from None


class TopSkip(nn.Module):
    """Feeds encoder feature 0 (full resolution) into the last Unet decoder block as its skip.

    smp's Unet drops feature 0 because its encoders return the raw input there; the plain
    encoder returns its first double-conv block instead, so the classic U-Net's top skip exists.
    """

    def __init__(self) -> None:
        super().__init__()
        self._feature0 = None

    def capture(self, decoder, args):
        self._feature0 = args[0][0]

    def inject(self, block, args, kwargs):
        kwargs["skip_connection"], self._feature0 = self._feature0, None
        return args, kwargs


def build_unet(in_channels: int, classes: int, **params) -> nn.Module:
    """smp.Unet; with a plain encoder the classic U-Net (depth 4, mirrored widths, top skip)."""
    encoder = params.get("encoder", "resnet34")
    if not is_plain(encoder):
        return build_smp(smp.Unet, in_channels, classes, **params)
    width = PLAIN_ENCODERS[encoder]
    depth = params.setdefault("encoder_depth", 4)
    params.setdefault("decoder_channels", tuple(width * 2**i for i in reversed(range(depth))))
    model = build_smp(smp.Unet, in_channels, classes, **params)
    last = model.decoder.blocks[-1]
    new = UnetDecoderBlock(
        last.conv1[0].in_channels, width, last.conv2[0].out_channels,
        use_norm=decoder_norm(params.get("decoder_use_norm", "batchnorm")),
        attention_type=params.get("decoder_attention_type"),
        interpolation_mode=params.get("decoder_interpolation", "nearest"),
    )
    smp_init.initialize_decoder(new)
    model.decoder.blocks[-1] = new
    model.decoder.top_skip = TopSkip()
    model.decoder.register_forward_pre_hook(model.decoder.top_skip.capture)
    new.register_forward_pre_hook(model.decoder.top_skip.inject, with_kwargs=True)
    return model


for _name, _info in SMP_ARCHS.items():
    register_arch(_name, _info.description, _info.model_class, _info.input,
                  params=arch_params(_name, _info.model_class), skips=_info.skips,
                  feature_list=_info.feature_list)(
        build_unet if _name == "unet" else functools.partial(build_smp, _info.model_class))
