"""Feedback U-Net with ConvLSTM (Shibuya & Hotta, CVPR-W 2020; METHODS.md §2).

Two rounds with shared convolution weights: round 1 sees the image, round 2 round 1's softmax
probabilities through its own first convolution; BatchNorm is per round; recurrent cells start
from zero state in round 1 and carry their state into round 2. Loss λ·L_round1 + L_round2.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..blocks import conv_like
from ..hooks import (classes_of, decoder_block, decoder_out_channels, decoder_reads_input,
                     encoder_channels, encoder_returns_input, encoder_stage, first_conv,
                     has_feature_list, head_output, in_channels_of, output_channels, probe_size,
                     set_child, transform_decoder_output, transform_encoder_features,
                     transform_output)
from ..registry import PluginConfigError, Range, register_plugin
from ..rounds import Feedback, RoundState, RoundSwitch, install_rounds

PLACES = ("e1", "e2", "bottleneck", "d2", "d1")


class ConvLSTMCell(nn.Module):
    """ConvLSTM (Shi et al., 2015), kernel k: gates = W_x∗x + W_h∗h + b; h is the output.

    i, o, f = σ(·), g = tanh(·); c' = f⊙c + i⊙g; h' = o⊙tanh(c').
    (N, C_in, H, W) → (N, C_hidden, H, W). Gate rows are stored in the order i, o, g, f; the
    forget gate's bias starts at 1 (Keras' ``unit_forget_bias``, the library the paper used).
    With zero state (round 1) the W_h∗h and f⊙c terms are zero: only the i, o, g rows of W_x
    are computed (exact, a quarter fewer MACs). State dicts of version 1 (cellseg 0.1.0's
    first landing: rows i, f, o, g) are reordered on load.
    """

    _version = 2

    def __init__(self, in_channels: int, hidden: int | None = None, kernel: int = 3):
        super().__init__()
        hidden = hidden or in_channels
        self.channels = hidden
        self.input_gates = nn.Conv2d(in_channels, 4 * hidden, kernel, padding=kernel // 2)
        self.hidden_gates = nn.Conv2d(hidden, 4 * hidden, kernel, padding=kernel // 2,
                                      bias=False)
        with torch.no_grad():
            self.input_gates.bias[3 * hidden:].fill_(1.0)

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
    """Recurrent convolutional layer (RU-Net style): h' = ReLU(conv_f(x) + conv_r(h)).

    (N, C_in, H, W) → (N, C_hidden, H, W).
    """

    def __init__(self, in_channels: int, hidden: int | None = None, kernel: int = 3):
        super().__init__()
        hidden = hidden or in_channels
        self.forward_conv = nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2)
        self.recurrent_conv = nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, bias=False)

    def forward(self, x, state):
        y = self.forward_conv(x)
        if state is not None:
            y = y + self.recurrent_conv(state)
        h = torch.relu(y)
        return h, h


class RecurrentPlace(nn.Module):
    """A cell at one place; keeps round 1's final state for round 2 (zero state in round 1).

    Used in place of a convolution (``mode='replace'``) or after a stage (``'add'``).
    """

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
    """Round 2's input: softmax(round-1 logits), with the image if ``feed='probs+image'``."""

    def __init__(self, feed: str, places: nn.ModuleDict):
        super().__init__()
        self.feed = feed
        self.places = places

    def reset(self) -> None:
        for place in self.places.values():
            place.memory = None

    def round2_inputs(self, inputs, round1_output):
        probs = round1_output.softmax(dim=1)
        if self.feed == "probs+image":
            probs = torch.cat([probs, inputs[0]], dim=1)
        return (probs,) + tuple(inputs[1:])


def encoder_feature_index(model: nn.Module, k: int) -> int:
    """Feature index of the k-th (1-based) highest-resolution non-input encoder stage."""
    first = 1 if encoder_returns_input(model) else 0
    chans = encoder_channels(model)
    real = [i for i in range(first, len(chans) - 1) if chans[i] > 0]
    if k > len(real):
        raise PluginConfigError(f"the encoder has no stage e{k}")
    return real[k - 1]


def place_block(model: nn.Module, name: str) -> tuple[nn.Module | None, int | None]:
    """The block computing a place (None where the model has no such module) and, for encoder
    places, the feature index."""
    if name in ("e1", "e2", "bottleneck"):
        chans = encoder_channels(model)
        index = len(chans) - 1 if name == "bottleneck" else encoder_feature_index(model, int(name[1]))
        return encoder_stage(model, index), index
    return decoder_block(model, 1 if name == "d1" else 2), None


def block_convs(block: nn.Module | None) -> list[nn.Conv2d]:
    """The 3×3 convolutions of a block, in order (SE gates and 1×1 convs left out)."""
    if block is None:
        return []
    return [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def make_cell(cell_type: str, in_channels: int, hidden: int) -> nn.Module:
    return (ConvLSTMCell(in_channels, hidden) if cell_type == "convlstm"
            else RecurrentConvCell(in_channels, hidden))


def replace_convs(block: nn.Module, count: int, cell_type: str, state: RoundState,
                  keep: nn.Module) -> list:
    """Swap the block's last ``count`` 3×3 convolutions (never ``keep``) for recurrent cells."""
    places = []
    for conv in block_convs(block)[-count:]:
        if conv is keep:
            raise PluginConfigError("a cell cannot replace the convolution that sees the input "
                                    "(it has one per round); choose another place for 'double'")
        place = RecurrentPlace(make_cell(cell_type, conv.in_channels, conv.out_channels), state)
        set_child(block, conv, place)
        places.append(place)
    return places


def add_cell(model: nn.Module, name: str, cell_type: str, state: RoundState) -> RecurrentPlace:
    """A cell after the place's output (h replaces the feature)."""
    block, index = place_block(model, name)
    if name == "d1":
        channels = decoder_out_channels(model)
    elif name == "d2":
        if block is None:
            raise PluginConfigError(f"place 'd2' needs a decoder with a list of blocks; "
                                    f"{type(model).__name__} has none")
        channels = output_channels(model, block)
    else:
        channels = encoder_channels(model)[index]
    place = RecurrentPlace(make_cell(cell_type, channels, channels), state)
    if name == "d1":
        transform_decoder_output(model, "convlstm_d1", place)
    elif block is not None:  # the stage's own output continues down the encoder / decoder
        transform_output(block, place.module_hook)
    else:  # an encoder whose stages are not modules we know: transform the returned feature
        transform_encoder_features(model, f"convlstm_{name}", {index: place})
    return place


def install_cells(model, places, cell_type, mode, double, state, first) -> nn.ModuleDict:
    cells = nn.ModuleDict()
    for name in places:
        block, _ = place_block(model, name)
        replaceable = len(block_convs(block)) >= (2 if double == name else 1)
        if mode == "replace" and not replaceable:
            raise PluginConfigError(
                f"mode='replace': place {name!r} has no double-conv block to put a cell into "
                f"in {type(model).__name__} (plain encoders, classic_unet and unet decoders "
                "have one); use mode='auto' or 'add'")
        if mode != "add" and replaceable:
            found = replace_convs(block, 2 if double == name else 1, cell_type, state, first)
        else:
            found = [add_cell(model, name, cell_type, state)]
        names = [name] if len(found) == 1 else [f"{name}_conv1", name]
        cells.update(zip(names, found))
    return cells


def default_places(model: nn.Module) -> list[str]:
    """The paper's five places; d2 only where the decoder has blocks."""
    return [p for p in PLACES if p != "d2" or decoder_block(model, 2) is not None]


@register_plugin("feedback_convlstm", supports=has_feature_list, exclusive="rounds")
def feedback_convlstm(
    model: nn.Module,
    lam: Annotated[float, Range(0, None)] = 0.5,
    at: Sequence[Literal[PLACES]] | None = None,
    cell: Literal["convlstm", "rcl", "none"] = "convlstm",
    mode: Literal["auto", "replace", "add"] = "auto",
    double: Literal[PLACES] | None = "bottleneck",
    per_round_bn: bool = True,
    feed: Literal["probs", "probs+image"] = "probs",
    predict: Literal[1, 2] = 2,
) -> nn.Module:
    """Feedback U-Net: round 2 sees round 1's probabilities; ConvLSTM state carries over.

    Feed: "the probability map of each class is fed back to input layer ... 4 probability
    maps are fed back" (§3.1): round 2's input is softmax(round 1), through a first
    convolution of its own (the image has other channels than the class maps; every other
    convolution is shared: "we use the same convolutional layers for both rounds");
    ``feed='probs+image'`` also gives it the image. "we use different batch normalization for
    each round" (``per_round_bn``). Cells: "our approach replaces convolutional layer with
    convolutional LSTM" and "Our model incorporates 6 convolutional LSTM" at five places
    (``at``, default e1, e2 = the two highest-resolution encoder stages, bottleneck, d2, d1 =
    the two highest-resolution decoder blocks). ``mode='replace'`` puts the cell in place of
    the block's second 3×3 conv (its BatchNorm and ReLU follow); ``'add'`` puts a cell after
    the stage; ``'auto'`` (default) replaces where the place is a double-conv block (plain
    encoders, classic_unet, unet / manet decoders) and adds elsewhere. The paper does not say
    which place has two cells: ``double`` (default the bottleneck) replaces both convs there
    (6 cells) when it is among the places and replaced, ``double=None`` gives one cell per
    place. ``cell``: convlstm (kernel 3, hidden
    = the conv's channels), rcl (recurrent conv layer) or none (two rounds without
    recurrence). Loss "L = λ L_first + L_second ... we set λ to 0.5" (Eq. 2).
    ``predict=1``: eval-mode forwards return round 1.
    """
    state = RoundState()
    places = list(at) if at is not None else default_places(model)
    if len(set(places)) != len(places):
        raise PluginConfigError(f"at={places}: a place is named twice")
    classes, in_channels, first = classes_of(model), in_channels_of(model), first_conv(model)
    size, out = probe_size(model), head_output(model).shape[-2:]
    if tuple(out) != (size, size):
        raise PluginConfigError(
            f"round 2's input is round 1's class probabilities, so the output must have the "
            f"input's size; {type(model).__name__} gives {out[0]}×{out[1]} for {size}×{size} "
            "(smp's upsampling sets it)")
    if decoder_reads_input(model):
        raise PluginConfigError(
            f"{type(model).__name__}'s decoder reads the input image itself as a skip (FPN at "
            "encoder_depth=3 does), and round 2's input is round 1's class probabilities, which "
            "that skip's convolution cannot take; use a larger encoder_depth")
    cells = nn.ModuleDict() if cell == "none" else install_cells(
        model, places, cell, mode, double, state, first)
    extra = in_channels if feed == "probs+image" else 0
    set_child(model, first, RoundSwitch([first, conv_like(first, in_channels=classes + extra)],
                                        state))
    install_rounds(model, ProbabilityFeedback(feed, cells), state, lam, predict, per_round_bn)
    return model
