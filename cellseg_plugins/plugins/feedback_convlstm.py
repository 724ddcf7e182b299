"""Feedback U-Net with ConvLSTM (Shibuya & Hotta, CVPR-W 2020; METHODS.md §2).

Two rounds with shared convolution weights: round 1 sees the image, round 2 round 1's softmax
probabilities (through a per-round input projection); BatchNorm is per round; recurrent cells
at named places start from zero state in round 1 and carry their state into round 2.
Loss λ·L_round1 + L_round2.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..encoders import PlainEncoder
from ..hooks import (FEATURE_LIST_ARCHS, classes_of, decoder_out_channels, encoder_channels,
                     in_channels_of, output_channels, transform_encoder_features)
from ..registry import PluginConfigError, Range, register_plugin
from ..rounds import Feedback, RoundState, install_rounds

PLACES = ("e1", "e2", "bottleneck", "d2", "d1")


class ConvLSTMCell(nn.Module):
    """ConvLSTM (Shi et al., 2015), kernel k: gates = W_x∗x + W_h∗h + b; h replaces the feature.

    i, o, f = σ(·), g = tanh(·); c' = f⊙c + i⊙g; h' = o⊙tanh(c'). (N, C, H, W) → (N, C, H, W).
    Gate rows are stored in the order i, o, g, f. With zero state (round 1) the W_h∗h and f⊙c
    terms are zero: only the i, o, g rows of W_x are computed (exact, a quarter fewer MACs).
    State dicts of version 1 (cellseg 0.1.0's first landing: rows i, f, o, g) are reordered on
    load.
    """

    _version = 2

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.channels = channels
        self.input_gates = nn.Conv2d(channels, 4 * channels, kernel, padding=kernel // 2)
        self.hidden_gates = nn.Conv2d(channels, 4 * channels, kernel, padding=kernel // 2,
                                      bias=False)

    def forward(self, x, state):
        if state is None:
            rows = 3 * self.channels  # i, o, g
            conv = self.input_gates
            gates = F.conv2d(x, conv.weight[:rows], conv.bias[:rows], padding=conv.padding)
            i, o, g = gates.chunk(3, dim=1)
            c = torch.sigmoid(i) * torch.tanh(g)
        else:
            gates = self.input_gates(x) + self.hidden_gates(state[0])
            i, o, g, f = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", 1) < 2:  # rows i, f, o, g → i, o, g, f
            for key in ("input_gates.weight", "input_gates.bias", "hidden_gates.weight"):
                if prefix + key in state_dict:
                    i, f, o, g = state_dict[prefix + key].chunk(4, dim=0)
                    state_dict[prefix + key] = torch.cat([i, o, g, f])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class RecurrentConvCell(nn.Module):
    """Recurrent convolutional layer (RU-Net style): h' = ReLU(conv_f(x) + conv_r(h))."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.forward_conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.recurrent_conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)

    def forward(self, x, state):
        y = self.forward_conv(x)
        if state is not None:
            y = y + self.recurrent_conv(state)
        h = torch.relu(y)
        return h, h


class RecurrentPlace(nn.Module):
    """A cell at one place; keeps round 1's final state for round 2 (zero state in round 1)."""

    def __init__(self, cell: nn.Module, state: RoundState):
        super().__init__()
        self.cell, self.round = cell, state
        self.memory = None
        self.zero_carried_state = False  # tests / ablation: forget round 1's state

    def step(self, x: torch.Tensor) -> torch.Tensor:
        carried = None if self.round.current == 0 or self.zero_carried_state else self.memory
        h, self.memory = self.cell(x, carried)
        return h

    def module_hook(self, module, inputs, output):
        return self.step(output)

    def forward(self, x):
        return self.step(x)


class ProbabilityFeedback(Feedback):
    """Round 2's input: softmax(round-1 logits) (optionally with the image) → input channels."""

    def __init__(self, classes: int, in_channels: int, feed: str, places: nn.ModuleDict):
        super().__init__()
        self.feed = feed
        extra = in_channels if feed == "probs+image" else 0
        self.project = nn.Conv2d(classes + extra, in_channels, 1)
        self.places = places

    def reset(self) -> None:
        for place in self.places.values():
            place.memory = None

    def round2_inputs(self, inputs, round1_output):
        probs = round1_output.softmax(dim=1)
        if self.feed == "probs+image":
            probs = torch.cat([probs, inputs[0]], dim=1)
        return (self.project(probs),) + tuple(inputs[1:])


def encoder_feature_index(model: nn.Module, k: int) -> int:
    """Feature index of the k-th (1-based) highest-resolution non-input encoder stage."""
    first = 0 if isinstance(model.encoder, PlainEncoder) else 1
    chans = encoder_channels(model)
    real = [i for i in range(first, len(chans) - 1) if chans[i] > 0]
    if k > len(real):
        raise PluginConfigError(f"the encoder has no stage e{k}")
    return real[k - 1]


def install_place(model: nn.Module, name: str, cell_type: str, state: RoundState) -> RecurrentPlace:
    chans = encoder_channels(model)
    blocks = getattr(model.decoder, "blocks", None)
    if name in ("e1", "e2", "bottleneck"):
        index = len(chans) - 1 if name == "bottleneck" else encoder_feature_index(model, int(name[1]))
        channels = chans[index]
        if isinstance(model.encoder, PlainEncoder):  # exact: the stage's own output continues down
            module = model.encoder.stem if index == 0 else model.encoder.stages[index - 1]
        else:
            module = None
    elif name == "d1":
        channels, module = decoder_out_channels(model), model.decoder
    else:  # d2: the decoder block before the last one
        if not isinstance(blocks, nn.ModuleList) or len(blocks) < 2:
            raise PluginConfigError(f"place 'd2' needs a decoder with a list of blocks "
                                    f"(unet, manet, linknet); {type(model).__name__} has none")
        module = blocks[-2]
        channels = output_channels(model, module)
    cell = (ConvLSTMCell(channels) if cell_type == "convlstm" else RecurrentConvCell(channels))
    place = RecurrentPlace(cell, state)
    if module is not None:
        module.register_forward_hook(place.module_hook)
    else:  # encoder without stage modules we know: transform the feature it returns
        transform_encoder_features(model, f"convlstm_{name}", {index: place})
    return place


@register_plugin("feedback_convlstm", supports=FEATURE_LIST_ARCHS, exclusive="rounds")
def feedback_convlstm(
    model: nn.Module,
    lam: Annotated[float, Range(0, None)] = 0.5,
    at: Sequence[Literal[PLACES]] | None = None,
    cell: Literal["convlstm", "rcl", "none"] = "convlstm",
    per_round_bn: bool = True,
    feed: Literal["probs", "probs+image"] = "probs",
    predict: Literal[1, 2] = 2,
) -> nn.Module:
    """Feedback U-Net: round 2 sees round 1's probabilities; ConvLSTM state carries over.

    ``at``: places of the recurrent cells, default the paper's — e1, e2 (the two
    highest-resolution encoder stages), bottleneck, d2, d1 (the two highest-resolution decoder
    stages; d1 is the decoder output, d2 the block before it, where the decoder has blocks).
    ``cell``: convlstm (kernel 3), rcl (recurrent conv layer) or none (two rounds without
    recurrence). ``per_round_bn``: one BatchNorm per round. Loss λ·L_round1 + L_round2.
    """
    state = RoundState()
    places = list(at) if at is not None else [
        p for p in PLACES if p != "d2" or isinstance(getattr(model.decoder, "blocks", None), nn.ModuleList)]
    if len(set(places)) != len(places):
        raise PluginConfigError(f"at={places}: a place is named twice")
    cells = nn.ModuleDict()
    if cell != "none":
        for name in places:
            cells[name] = install_place(model, name, cell, state)
    feedback = ProbabilityFeedback(classes_of(model), in_channels_of(model), feed, cells)
    install_rounds(model, feedback, state, lam, predict, per_round_bn)
    return model
