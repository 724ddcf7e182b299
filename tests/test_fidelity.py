"""The plugins' wiring against the papers: where features come from and go, which round's
loss counts, what gets a gradient; the baselines against hand-written references."""

import pytest
import torch
from torch.nn import functional as F

import cellseg_plugins as cs
from cellseg_plugins.blocks import SqueezeExcitation
from cellseg_plugins.classic_unet import ClassicDecoderBlock
from cellseg_plugins.plugins.attention_gate import AttentionGate
from cellseg_plugins.plugins.bottleneck_attention import SelfAttention2d
from cellseg_plugins.plugins.feedback_convlstm import ConvLSTMCell, RecurrentPlace
from cellseg_plugins.plugins.lfa import LocalFeatureAggregation
from cellseg_plugins.plugins.scse import SCSE
from cellseg_plugins.rounds import RoundSwitch, set_prediction_round

CLASSIC = "classic_unet"
CE = torch.nn.CrossEntropyLoss()


def data(n=2, size=32, classes=3):
    torch.manual_seed(1)
    return torch.randn(n, 1, size, size), torch.randint(0, classes, (n, size, size))


# ---------------------------------------------------------------- the papers' U-Net


def test_classic_unet_is_the_papers_network():
    model = cs.create_model(CLASSIC, classes=4)
    assert model.encoder.out_channels == [8, 16, 32, 64, 128]
    blocks = model.decoder.blocks
    assert [type(b.up).__name__ for b in blocks] == ["ConvTranspose2d"] * 4
    assert [(b.up.in_channels, b.up.out_channels) for b in blocks] == [
        (128, 64), (64, 32), (32, 16), (16, 8)]
    assert [b.convs[0].in_channels for b in blocks] == [128, 64, 32, 16]  # concatenation
    head = model.segmentation_head[0]
    assert head.kernel_size == (1, 1) and (head.in_channels, head.out_channels) == (8, 4)
    assert model(torch.randn(1, 1, 48, 48)).shape == (1, 4, 48, 48)


def test_se_unet_has_an_se_block_after_every_double_conv():
    model = cs.create_model(f"{CLASSIC}(width=32,se=True)", classes=4)
    assert model.encoder.out_channels[-1] == 512  # the FREM paper's bottleneck
    assert sum(isinstance(m, SqueezeExcitation) for m in model.modules()) == 5 + 4
    assert not any(isinstance(m, SqueezeExcitation)
                   for m in cs.create_model(CLASSIC).modules())


# ---------------------------------------------------------------- rounds: predict and losses


@pytest.mark.parametrize("plugin", ["feedback_self(predict=1)", "feedback_convlstm(predict=1)"])
def test_predict_1_still_trains_round_2_and_evaluates_round_1(plugin):
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+{plugin}", classes=3).train()
    if "self" in plugin:
        with torch.no_grad():
            model.rounds.feedback.scale.fill_(0.5)  # β = 0 would make round 2 equal round 1
    x, y = data()
    out = model(x)
    assert not torch.equal(out, model.rounds.round1_output)  # training returns round 2
    CE(out, y).backward()
    if "self" in plugin:
        assert model.rounds.feedback.scale.grad.abs() > 0  # the feedback path learns
    else:
        assert model.encoder.stem[0].slots[1].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        first = model(x)
        set_prediction_round(model, 2)
        second = model(x)
    assert torch.equal(first, model.rounds.round1_output) and not torch.equal(first, second)


def test_round1_of_a_normally_trained_model():
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+feedback_convlstm", classes=3).eval()
    x, _ = data()
    with torch.no_grad():
        second = model(x)
        round1 = model.rounds.round1_output
        set_prediction_round(model, 1)
        assert torch.equal(model(x), round1) and not torch.equal(round1, second)
    with pytest.raises(cs.PluginConfigError, match="two-round"):
        set_prediction_round(cs.create_model(CLASSIC), 1)


def test_auxiliary_losses_count_once_from_round_2():
    torch.manual_seed(0)
    model = cs.create_model(
        f"{CLASSIC}+bottleneck_supervision(lam=0.3,form='add')+feedback_convlstm", classes=3)
    model.train()
    classifier = next(m for m in model.modules() if type(m).__name__ == "BottleneckSupervision")
    seen = []
    classifier.classifier.register_forward_hook(lambda m, i, out: seen.append(out))
    x, y = data()
    out = model(x)
    outputs = cs.registry.protocol.pop_aux_outputs(model)
    assert sorted(a.name for a in outputs) == ["bottleneck_supervision", "round1"]
    assert len(seen) == 2  # computed in both rounds ...
    aux = next(a for a in outputs if a.name == "bottleneck_supervision")
    assert aux.logits is seen[1]  # ... counted from round 2 only
    torch.manual_seed(0)
    total = cs.training_loss(model, x, y, CE)
    logits = F.interpolate(seen[3], size=(32, 32), mode="bilinear", align_corners=False)
    r1 = model.rounds.round1_output
    assert torch.isclose(total, CE(out, y) + 0.3 * CE(logits, y) + 0.5 * CE(r1, y), atol=1e-5)


def test_deep_supervision_is_the_papers_convex_combination():
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+bottleneck_supervision", classes=3).train()
    head = next(m for m in model.modules() if type(m).__name__ == "BottleneckSupervision")
    assert head.lam == 0.2781
    seen = []
    head.classifier.register_forward_hook(lambda m, i, out: seen.append(out))
    model.segmentation_head.register_forward_hook(lambda m, i, out: seen.append(out))
    x, y = data()
    total = cs.training_loss(model, x, y, CE)
    aux = F.interpolate(seen[0], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.isclose(total, 0.7219 * CE(seen[1], y) + 0.2781 * CE(aux, y), atol=1e-6)


# ---------------------------------------------------------------- Feedback Attention


@pytest.mark.parametrize("order", ["scse(where='decoder')+feedback_self",
                                   "feedback_self+scse(where='decoder')"])
def test_fa_takes_o_where_it_enters_the_head_whatever_the_order(order):
    torch.manual_seed(0)
    model = cs.create_model(f"unet(encoder='resnet18')+{order}", classes=3).eval()
    head_inputs, o_used = [], []
    model.segmentation_head.register_forward_pre_hook(lambda m, a: head_inputs.append(a[0]))
    model.rounds.feedback.connect.register_forward_pre_hook(lambda m, a: o_used.append(a[1]))
    model(torch.randn(1, 1, 64, 64))
    assert len(head_inputs) == 2 and torch.equal(o_used[0], head_inputs[0])  # round 1's O


def test_fa_a_lands_at_f_and_flows_on_with_gradients_into_round_1():
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+feedback_self", classes=3).train()
    with torch.no_grad():
        model.rounds.feedback.scale.fill_(0.5)
    stem_out, stage1_in = [], []
    model.encoder.stem.register_forward_hook(lambda m, i, out: stem_out.append(out))
    model.encoder.stages[0].register_forward_pre_hook(lambda m, a: stage1_in.append(a[0]))
    top = model.decoder.blocks[-1].fuse
    skips = []
    top.register_forward_pre_hook(lambda m, a: skips.append(a[1]))
    x, y = data()
    out = model(x)
    # round 2: the stem's output is A (≠ round 1's F) and is what the encoder and the top skip use
    assert not torch.allclose(stem_out[1], stem_out[0])
    assert stage1_in[1] is stem_out[1] and skips[1] is stem_out[1]
    CE(out, y).backward()  # the loss is round 2's only; round 1's decoder learns through O
    assert model.decoder.blocks[0].up.weight.grad.abs().sum() > 0
    assert model.rounds.feedback.connect.q[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- ConvLSTM feedback


def test_convlstm_round2_input_is_round1_softmax_through_its_own_first_conv():
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+feedback_convlstm", classes=3).eval()
    switch = model.encoder.stem[0]
    assert isinstance(switch, RoundSwitch)
    assert (switch.slots[0].in_channels, switch.slots[1].in_channels) == (1, 3)  # 3 class maps
    seen = []
    switch.slots[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x, _ = data()
    model(x)
    assert torch.allclose(seen[0], model.rounds.round1_output.softmax(1))
    image = cs.create_model(f"{CLASSIC}+feedback_convlstm(feed='probs+image')", classes=3)
    assert image.encoder.stem[0].slots[1].in_channels == 4


def test_convlstm_cells_replace_the_second_conv_at_the_papers_places():
    model = cs.create_model(f"{CLASSIC}+feedback_convlstm", classes=3)
    enc, dec = model.encoder, model.decoder
    places = {
        "e1": enc.stem[3], "e2": enc.stages[0][1][3], "bottleneck": enc.stages[-1][1][3],
        "bottleneck_conv1": enc.stages[-1][1][0], "d2": dec.blocks[-2].convs[3],
        "d1": dec.blocks[-1].convs[3]}
    for name, module in places.items():
        assert isinstance(module, RecurrentPlace), name
        assert model.rounds.feedback.places[name] is module
    assert [(p.cell.input_gates.in_channels, p.cell.channels) for p in places.values()] == [
        (8, 8), (16, 16), (128, 128), (64, 128), (16, 16), (8, 8)]
    cells = [m for m in model.modules() if isinstance(m, RecurrentPlace)]
    assert len(cells) == 6
    single = cs.create_model(f"{CLASSIC}+feedback_convlstm(double=None)", classes=3)
    assert sum(isinstance(m, RecurrentPlace) for m in single.modules()) == 5


def test_convlstm_forget_bias_starts_at_one():
    cell = ConvLSTMCell(4, 6)
    assert torch.equal(cell.input_gates.bias[18:], torch.ones(6))


def test_convlstm_state_resets_between_batches_and_convs_are_shared():
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+feedback_convlstm", classes=3).eval()
    x, _ = data()
    assert torch.equal(model(x), model(x))  # no state leaks from the previous batch
    shared = model.encoder.stages[1][1][0]  # a plain conv, used by both rounds
    calls = []
    shared.register_forward_hook(lambda m, i, o: calls.append(m))
    model(x)
    assert len(calls) == 2 and calls[0] is calls[1]


def test_convlstm_add_mode_where_replacing_is_impossible():
    model = cs.create_model("unet(encoder='resnet18')+feedback_convlstm", classes=3)
    dec = model.decoder.blocks
    assert isinstance(dec[-1].conv2[0], RecurrentPlace)  # smp's unet block: replaced
    assert not isinstance(model.encoder.layer1, RecurrentPlace)
    with pytest.raises(cs.SpecError, match="mode='replace'"):
        cs.create_model("unet(encoder='resnet18')+feedback_convlstm(mode='replace')")


# ---------------------------------------------------------------- LFA


@pytest.mark.parametrize("fusion", ["auto", "concat"])
def test_lfa_output_is_what_the_decoder_convolution_receives(fusion):
    torch.manual_seed(0)
    model = cs.create_model(f"{CLASSIC}+lfa(m=3,fusion='{fusion}')", classes=3).eval()
    block = model.decoder.blocks[0]
    lfa = next(m for m in block.modules() if isinstance(m, LocalFeatureAggregation))
    seen = {}
    block.up.register_forward_hook(lambda m, i, out: seen.setdefault("up", out))
    lfa.register_forward_hook(lambda m, i, out: seen.setdefault("lfa", out))
    block.convs[0].register_forward_pre_hook(lambda m, a: seen.setdefault("conv", a[0]))
    model(torch.randn(1, 1, 32, 32))
    expected = seen["lfa"] if fusion == "auto" else torch.cat([seen["up"], seen["lfa"]], 1)
    assert torch.equal(seen["conv"], expected)
    assert block.convs[0].in_channels == (64 if fusion == "auto" else 128)


def test_lfa_replace_is_refused_where_the_block_fuses_inline():
    with pytest.raises(cs.SpecError, match="fusion='replace'"):
        cs.create_model("unet(encoder='resnet18')+lfa(fusion='replace')")


# ---------------------------------------------------------------- FREM and channel dropout


def test_frem_b_as_a_share_of_the_bottleneck():
    model = cs.create_model(f"{CLASSIC}+frem(B=0.015625)", classes=3)
    module = next(m for m in model.modules() if type(m).__name__ == "FeatureRandomEnhancement")
    assert module.C == 128 and module.B == 2  # 8/512 of 128 channels
    se = cs.create_model(f"{CLASSIC}(width=32,se=True)+frem(B=0.015625)", classes=3)
    assert next(m for m in se.modules() if type(m).__name__ == "FeatureRandomEnhancement").B == 8
    with pytest.raises(cs.SpecError, match="share"):
        cs.create_model(f"{CLASSIC}+frem(B=2.5)")


@pytest.mark.parametrize("spec, rate", [("bottleneck_dropout", 8 / 128),
                                        ("bottleneck_dropout(B=0.015625)", 2 / 128),
                                        ("bottleneck_dropout(p=0.2)", 0.2)])
def test_channel_dropout_rate_is_b_over_the_actual_channels(spec, rate):
    model = cs.create_model(f"{CLASSIC}+{spec}", classes=3)
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout2d))
    assert dropout.p == pytest.approx(rate)


# ---------------------------------------------------------------- baselines vs references


def test_attention_gate_matches_a_hand_written_reference():
    torch.manual_seed(0)
    gate = AttentionGate(4, 6).eval()
    skip, g = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)

    def conv_bn(seq, t):
        conv, bn = seq[0], seq[1]
        t = F.conv2d(t, conv.weight, conv.bias)
        return (t - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            bn.running_var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1) + \
            bn.bias.view(1, -1, 1, 1)

    g_up = g.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest ×2
    alpha = torch.sigmoid(conv_bn(gate.psi, F.relu(conv_bn(gate.w_x, skip) + conv_bn(gate.w_g, g_up))))
    assert torch.allclose(gate(g, skip), skip * alpha, atol=1e-6)


def test_sagan_block_matches_a_pixel_loop_reference():
    torch.manual_seed(0)
    block = SelfAttention2d(16).eval()
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(1, 16, 3, 4)
    a = block.attention
    q, k, v = (m(x)[0].flatten(1) for m in (a.q, a.k, a.v))  # (C', HW)
    y = torch.zeros(v.shape)
    for i in range(q.shape[1]):
        w = torch.softmax(torch.stack([q[:, i] @ k[:, j] for j in range(k.shape[1])]), 0)
        y[:, i] = sum(w[j] * v[:, j] for j in range(v.shape[1]))
    expected = x + 0.7 * a.out(y.view(1, -1, 3, 4))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_scse_matches_a_hand_written_reference():
    torch.manual_seed(0)
    block = SCSE(8, reduction=2).eval()
    x = torch.randn(2, 8, 5, 5)
    c1, c2 = block.cse[1], block.cse[3]
    pooled = x.mean((2, 3), keepdim=True)
    cse = torch.sigmoid(F.conv2d(F.relu(F.conv2d(pooled, c1.weight, c1.bias)), c2.weight, c2.bias))
    sse = torch.sigmoid(F.conv2d(x, block.sse[0].weight, block.sse[0].bias))
    assert torch.allclose(block(x), x * cse + x * sse, atol=1e-6)


def test_classic_decoder_block_replaces_concatenation_only_when_asked():
    block = ClassicDecoderBlock(16, 8)
    assert block.fuse.mode == "concat" and block.convs[0].in_channels == 16
    block.replace_concatenation()
    assert block.fuse.mode == "replace" and block.convs[0].in_channels == 8
