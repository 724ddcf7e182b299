import copy

import pytest
import torch
from torch.nn import functional as F

import cellseg_plugins as cs
from cellseg_plugins.full_attention import attention, fused_attention
from cellseg_plugins.plugins.feedback_attention import AttentionConnection, FeedbackAttention
from cellseg_plugins.plugins.feedback_convlstm import RecurrentPlace
from cellseg_plugins.rounds import RoundBatchNorm, RoundState

PLAIN = "unet(encoder='plain8')"


def dense_reference(q, k, v, scale=1.0):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


@pytest.mark.parametrize("chunk", [None, 5, 7, 64])
def test_attention_equals_dense_reference(chunk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 37, 4), torch.randn(2, 23, 4), torch.randn(2, 23, 6)
    ref = dense_reference(q, k, v)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*args, chunk=chunk)
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    ref_args = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_reference(*ref_args).square().sum().backward()
    for a, b in zip(args, ref_args):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("d, c", [(2, 8), (4, 6), (16, 9)])
def test_fused_attention_pads_to_a_fused_kernel_and_equals_dense(d, c):
    """torch's flash kernel runs it (the math fallback is switched off), whatever the strides."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 37, d), torch.randn(2, 23, d)
    v = torch.randn(2, c, 23).transpose(1, 2)  # as the plugin passes it: last stride ≠ 1
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fused_attention(*args, scale=0.7)
    assert out.shape == (2, 37, c)
    assert torch.allclose(out, dense_reference(q, k, v, 0.7), atol=1e-5)
    out.square().sum().backward()
    ref_args = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_reference(*ref_args, 0.7).square().sum().backward()
    for a, b in zip(args, ref_args):
        assert a.grad.shape == b.grad.shape and torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("kv_stride", [1, 2, 4])
@pytest.mark.parametrize("chunk", [None, 16])
def test_attention_connection_matches_dense(kv_stride, chunk):
    torch.manual_seed(0)
    module = AttentionConnection(16, kv_stride=kv_stride, chunk=chunk).eval()
    f, o = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    q = module.q(f).flatten(2).transpose(1, 2)
    k = torch.nn.functional.avg_pool2d(module.k(o), kv_stride).flatten(2).transpose(1, 2)
    v = torch.nn.functional.avg_pool2d(module.v(o), kv_stride).flatten(2).transpose(1, 2)
    y = dense_reference(q, k, v).transpose(1, 2).reshape(2, 8, 8, 8)
    assert torch.allclose(module(f, o), module.out(y), atol=1e-5)


@pytest.mark.parametrize("plugin", ["feedback_self", "feedback_st",
                                    "feedback_attention(connection='se')"])
@pytest.mark.parametrize("arch", [PLAIN, "unet(encoder='resnet18')", "fpn(encoder='resnet18')"])
def test_fresh_model_round2_equals_round1(plugin, arch):
    torch.manual_seed(0)
    model = cs.create_model(f"{arch}+{plugin}", classes=3).eval()
    out = model(torch.randn(2, 1, 64, 64))
    assert torch.equal(out, model.rounds.round1_output)


def test_scale_gets_a_gradient_and_then_round2_differs():
    torch.manual_seed(0)
    model = cs.create_model(PLAIN + "+feedback_self", classes=3).train()
    x = torch.randn(2, 1, 32, 32)
    model(x).square().mean().backward()
    scale = model.rounds.feedback.scale
    assert scale.grad is not None and scale.grad.abs() > 0
    with torch.no_grad():
        scale.fill_(0.5)
    model.eval()
    assert not torch.equal(model(x), model.rounds.round1_output)


def test_self_and_source_target_differ_only_in_the_query():
    torch.manual_seed(0)
    state = RoundState()
    self_fb = FeedbackAttention(state, 16, 16, "self", 1, None).eval()
    st_fb = FeedbackAttention(state, 16, 16, "st", 1, None).eval()
    st_fb.load_state_dict(self_fb.state_dict())
    f, o = torch.randn(1, 16, 6, 6), torch.randn(1, 16, 6, 6)
    assert torch.equal(self_fb.combine(f, o), st_fb.combine(o, o))  # self = Q from O
    assert not torch.allclose(self_fb.combine(f, o), st_fb.combine(f, o))


def test_feedback_site_is_the_plain_encoders_first_block():
    model = cs.create_model(PLAIN + "+feedback_self", classes=3)
    assert model.rounds.feedback.scale.shape == (1,)
    assert not hasattr(model, "feedback_stem")  # the plain encoder has F already
    resnet = cs.create_model("unet(encoder='resnet18')+feedback_self", classes=3)
    assert resnet.feedback_stem.convs[0].out_channels == 16  # = decoder output channels
    assert isinstance(resnet.rounds.feedback.project, torch.nn.Identity)
    with pytest.raises(cs.SpecError, match=r"stem_channels=8: this encoder has its own first"):
        cs.create_model(PLAIN + "+feedback_self(stem_channels=8)", classes=3)


def test_an_added_stem_is_at_most_the_papers_64_channels_and_o_is_mapped_to_it():
    """PSPNet's decoder gives O 512 channels: F's stem stays at the paper's 64 (a 512-wide
    full-resolution stem would cost more than the rest of the model), O gets a 1×1 conv."""
    psp = cs.create_model("pspnet(encoder='resnet18')+feedback_self", classes=3)
    assert psp.feedback_stem.convs[0].out_channels == 64
    assert psp.encoder.conv1.in_channels == 64  # the encoder now reads F
    project = psp.rounds.feedback.project
    assert (project.in_channels, project.out_channels) == (512, 64)
    wide = cs.create_model("pspnet(encoder='resnet18')+feedback_st(stem_channels=96)")
    assert wide.feedback_stem.convs[0].out_channels == 96
    assert wide.rounds.feedback.connect.q[0].in_channels == 96


def test_o_is_mapped_before_it_is_resized_as_after():
    """A 1×1 conv commutes with bilinear resizing: mapping PSPNet's coarse O (8 × 8 for a 64²
    input) before resizing it to F's 64² gives what resizing first gives."""
    torch.manual_seed(0)
    model = cs.create_model("pspnet(encoder='resnet18')+feedback_attention(connection='add')",
                            classes=3).eval()
    feedback, seen = model.rounds.feedback, {}
    model.feedback_stem.convs.register_forward_hook(lambda m, i, out: seen.setdefault("f", out))
    model.segmentation_head.register_forward_pre_hook(lambda m, i: seen.setdefault("o", i[0]))
    feedback.scale.data.fill_(1.0)
    with torch.no_grad():
        model(torch.randn(1, 1, 64, 64))  # round 1's F and O
        o = seen["o"]
        assert o.shape[-2:] == (8, 8)
        resized = F.interpolate(o, size=(64, 64), mode="bilinear", align_corners=False)
        expected = seen["f"] + feedback.project(resized)  # F + 1·add(O)
        feedback._o, feedback.state.current = o, 1  # as in round 2
        got = feedback.feed(None, None, seen["f"])
        feedback.state.current = 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lam_adds_the_round1_loss():
    torch.manual_seed(0)
    model = cs.create_model(PLAIN + "+feedback_self(lam=0.25)", classes=3).train()
    y = torch.randint(0, 3, (2, 32, 32))
    criterion = torch.nn.CrossEntropyLoss()
    model(torch.randn(2, 1, 32, 32))
    total, parts = cs.auxiliary_loss(model, y, criterion)
    assert torch.isclose(total, torch.tensor(0.25 * parts["round1"]))
    model(torch.randn(2, 1, 32, 32))
    model2 = cs.create_model(PLAIN + "+feedback_self", classes=3).train()
    model2(torch.randn(2, 1, 32, 32))
    assert cs.auxiliary_loss(model2, y, criterion) == (0.0, {})  # default: round 2 only


def test_rounds_plugins_are_exclusive():
    with pytest.raises(cs.SpecError, match="cannot be combined with 'feedback_self'"):
        cs.parse_spec("unet+feedback_self+feedback_convlstm")


# ---------------------------------------------------------------- ConvLSTM feedback


def test_convlstm_state_carries_into_round2():
    torch.manual_seed(0)
    model = cs.create_model(PLAIN + "+feedback_convlstm", classes=3).eval()
    x = torch.randn(1, 1, 32, 32)
    carried = model(x)
    places = [m for m in model.modules() if isinstance(m, RecurrentPlace)]
    assert len(places) == 6  # the paper's six cells: the bottleneck block holds two
    for p in places:
        p.zero_carried_state = True
    assert not torch.allclose(carried, model(x))


def test_two_sets_of_batchnorm_statistics():
    torch.manual_seed(0)
    model = cs.create_model(PLAIN + "+feedback_convlstm", classes=3).train()
    model(torch.randn(2, 1, 32, 32))
    bns = [m for m in model.modules() if isinstance(m, RoundBatchNorm)]
    assert bns and not any(isinstance(m, RoundBatchNorm) for b in bns for m in b.slots)
    first = bns[0]
    assert not torch.allclose(first.slots[0].running_mean, first.slots[1].running_mean)
    shared = cs.create_model(PLAIN + "+feedback_convlstm(per_round_bn=False)", classes=3)
    assert not any(isinstance(m, RoundBatchNorm) for m in shared.modules())


def test_per_round_batchnorm_covers_plugins_listed_after_the_rounds_plugin():
    model = cs.create_model("unet(encoder='resnet18')+feedback_convlstm+attention_gate", classes=3)
    plain_bns = [name for name, m in model.named_modules()
                 if isinstance(m, torch.nn.BatchNorm2d) and ".slots." not in name]
    assert plain_bns == []
    gates = [m for name, m in model.named_modules() if "attention_gate" in name.lower()
             and isinstance(m, RoundBatchNorm)]
    assert gates  # the gate's BatchNorms, added after feedback_convlstm, are per round too


def test_convlstm_aux_weight_reaches_total_loss():
    torch.manual_seed(0)
    model = cs.create_model(PLAIN + "+feedback_convlstm(lam=0.5)", classes=3).train()
    y = torch.randint(0, 3, (2, 32, 32))
    criterion = torch.nn.CrossEntropyLoss()
    out = model(torch.randn(2, 1, 32, 32))
    total, parts = cs.auxiliary_loss(model, y, criterion)
    assert torch.isclose(total, torch.tensor(0.5 * parts["round1"]))
    (criterion(out, y) + total).backward()
    round2_first_conv = model.encoder.stem[0].slots[1]
    assert round2_first_conv.weight.grad.abs().sum() > 0  # round 2 saw round 1


def test_training_loss_is_the_main_loss_plus_the_weighted_round1_loss():
    model = cs.create_model(PLAIN + "+feedback_convlstm(lam=0.5)", classes=3).train()
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    criterion = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    total = cs.training_loss(model, x, y, criterion)
    torch.manual_seed(0)
    main = criterion(model(x), y)
    aux, parts = cs.auxiliary_loss(model, y, criterion)
    assert parts and torch.isclose(total, main + 0.5 * parts["round1"])


@pytest.mark.parametrize("variant", ["cell='rcl'", "cell='none'", "feed='probs+image'",
                                     "at=['bottleneck','d1']"])
def test_convlstm_variants_train(variant):
    model = cs.create_model(f"{PLAIN}+feedback_convlstm({variant})", classes=3).train()
    model(torch.randn(2, 1, 32, 32)).mean().backward()


def test_composition_with_other_plugins():
    for spec in ["unet(encoder='resnet18')+lfa(m=7)+feedback_self",
                 "unet(encoder='resnet18')+frem+feedback_convlstm"]:
        model = cs.create_model(spec, classes=3).train()
        cs.epoch_start(model, 0)
        model(torch.randn(2, 1, 64, 64)).mean().backward()
        assert str(cs.parse_spec(spec)) == model.cellseg_spec


def test_deepcopy_of_a_two_round_model():
    model = cs.create_model(PLAIN + "+feedback_convlstm", classes=3).eval()
    clone = copy.deepcopy(model)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(model(x), clone(x))


def test_convlstm_cell_matches_the_textbook_equations():
    from cellseg_plugins.plugins.feedback_convlstm import ConvLSTMCell

    torch.manual_seed(0)
    cell = ConvLSTMCell(3)
    x, h, c = torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5)
    w = torch.cat([cell.input_gates.weight, cell.hidden_gates.weight], dim=1)
    gates = torch.nn.functional.conv2d(torch.cat([x, h], 1), w, cell.input_gates.bias, padding=1)
    i, o, g, f = gates.chunk(4, 1)
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    out, (h2, c2) = cell(x, (h, c))
    assert torch.allclose(out, h_ref, atol=1e-6) and torch.allclose(c2, c_ref, atol=1e-6)
    zero = torch.zeros_like(x)
    assert torch.allclose(cell(x, None)[0], cell(x, (zero, zero))[0], atol=1e-6)


def test_convlstm_state_dict_of_the_old_gate_order_loads_reordered(tmp_path):
    torch.manual_seed(0)
    model = cs.create_model(PLAIN + "+feedback_convlstm", classes=3).eval()
    x = torch.randn(1, 1, 32, 32)
    state = model.state_dict()
    old = type(state)((k, v.clone()) for k, v in state.items())
    old._metadata = {k: dict(v) for k, v in state._metadata.items()}
    for key, meta in old._metadata.items():  # write it as version 1 did: rows i, f, o, g
        if key.endswith(".cell") and meta.get("version") == 2:
            meta["version"] = 1
            for name in ("input_gates.weight", "input_gates.bias", "hidden_gates.weight"):
                i, o, g, f = old[f"{key}.{name}"].chunk(4)
                old[f"{key}.{name}"] = torch.cat([i, f, o, g])
    torch.save(old, tmp_path / "old.pt")
    fresh = cs.create_model(PLAIN + "+feedback_convlstm", classes=3).eval()
    fresh.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert torch.equal(fresh(x), model(x))


def test_cpu_training_at_256_warns_at_full_resolution_only():
    import warnings

    for kv_stride in (1, 4):
        state = RoundState()
        feedback = FeedbackAttention(state, 8, 8, "self", kv_stride=kv_stride, chunk=None).train()
        state.current = 1
        feedback._o = torch.randn(1, 8, 256, 256)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            feedback.feed(None, None, torch.randn(1, 8, 256, 256))
        said = [str(w.message) for w in caught if "attention is GPU work" in str(w.message)]
        assert len(said) == (kv_stride == 1), (kv_stride, said)  # kv_stride=4 is what it advises


@pytest.mark.parametrize("spec", ["unet(encoder='resnet18')+lfa(m=3)+feedback_self",
                                  "unet(encoder='resnet18')+feedback_self+lfa(m=3)"])
def test_plugins_run_in_both_rounds_whatever_their_order(spec):
    from cellseg_plugins.plugins.lfa import LocalFeatureAggregation

    model = cs.create_model(spec, classes=3).eval()
    lfa = [m for m in model.modules() if isinstance(m, LocalFeatureAggregation)]
    calls = []
    for m in lfa:
        m.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(1, 1, 64, 64))
    assert len(lfa) == 4 and len(calls) == 2 * len(lfa)


def test_an_added_stem_leaves_the_image_as_encoder_feature_0_for_decoders_that_read_it():
    """FPN at encoder_depth=3 reads feature 0, smp's encoders' copy of the input, as its p2
    skip: with Feedback Attention's stem in front of the encoder that skip still gets the
    image (not the stem's 64 channels), in both rounds."""
    torch.manual_seed(0)
    model = cs.create_model("fpn(encoder='resnet18',encoder_depth=3)+feedback_self",
                            classes=3).train()
    seen = []
    model.decoder.p2.skip_conv.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    out.mean().backward()
    assert out.shape == (2, 3, 64, 64) and len(seen) == 2
    for skip in seen:
        assert torch.equal(skip, x)
    assert model.feedback_stem.convs[0].weight.grad is not None  # F still feeds the encoder


def test_convlstm_refuses_models_whose_probabilities_cannot_be_round2s_input():
    import segmentation_models_pytorch as smp
    with pytest.raises(cs.SpecError, match=r"decoder reads the input image itself as a skip"):
        cs.create_model("fpn(encoder='resnet18',encoder_depth=3)+feedback_convlstm", classes=3)
    smp_fpn = smp.FPN("resnet18", encoder_weights=None, encoder_depth=4, in_channels=1, classes=3)
    with pytest.raises(cs.SpecError, match=r"FPN gives 256×256 for 128×128"):
        cs.apply_plugins(smp_fpn, "feedback_convlstm")  # smp's upsampling=4 fits depth 5 only
    model = cs.create_model("fpn(encoder='resnet18',encoder_depth=4)+feedback_convlstm",
                            classes=3)  # cellseg's upsampling fits the depth
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("plugin", ["feedback_self(lam=0.5)", "feedback_convlstm"])
def test_rounds_on_an_smp_model_with_a_classification_head(plugin):
    """smp's aux_params make the model return (mask logits, label logits): round 2 starts from
    round 1's mask logits, the model returns round 2's pair, λ·L_round1 is on the mask."""
    import segmentation_models_pytorch as smp
    torch.manual_seed(0)
    model = cs.apply_plugins(smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=3,
                                      aux_params={"classes": 2}), plugin).train()
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    masks, labels = model(x)
    assert masks.shape == (2, 3, 64, 64) and labels.shape == (2, 2)
    assert model.rounds.round1_output.shape == (2, 3, 64, 64)
    total, parts = cs.auxiliary_loss(model, y, torch.nn.CrossEntropyLoss())
    assert set(parts) == {"round1"} and total > 0
