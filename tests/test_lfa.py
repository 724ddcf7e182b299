import pytest
import torch

import cellseg_plugins as cs
from cellseg_plugins.local_attention import local_attention
from cellseg_plugins.plugins.lfa import LocalFeatureAggregation


def reference_local_attention(q, k, v, m):
    """Explicit loops over pixels and window offsets; out-of-image neighbours are skipped."""
    n_, _, height, width = q.shape
    r = m // 2
    out = torch.zeros_like(v)
    for n in range(n_):
        for h in range(height):
            for w in range(width):
                logits, values = [], []
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        hh, ww = h + dy, w + dx
                        if 0 <= hh < height and 0 <= ww < width:
                            logits.append((q[n, :, h, w] * k[n, :, hh, ww]).sum())
                            values.append(v[n, :, hh, ww])
                a = torch.softmax(torch.stack(logits), 0)
                out[n, :, h, w] = (a[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("m, size", [(3, (5, 6)), (7, (6, 5)), (5, (2, 9))])
def test_local_attention_matches_loops_including_borders(m, size):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, *size), torch.randn(2, 3, *size)
    v = torch.randn(2, 4, *size)
    assert torch.allclose(local_attention(q, k, v, m), reference_local_attention(q, k, v, m),
                          atol=1e-5)


def test_local_attention_gradients():
    torch.manual_seed(0)
    args = [torch.randn(1, c, 4, 5, dtype=torch.float64, requires_grad=True) for c in (2, 2, 3)]
    assert torch.autograd.gradcheck(lambda q, k, v: local_attention(q, k, v, 3), args)
    assert torch.autograd.gradcheck(lambda q, k, v: local_attention(q, k, v, 7), args)


def test_the_cpu_loops_run_over_blocks_of_the_batch_of_about_two_mib():
    """Blocks small enough for a core's L2 cache on the CPU; one block (one launch) elsewhere."""
    from cellseg_plugins.local_attention import _batch_blocks
    assert _batch_blocks(torch.empty(8, 8, 256, 256)) == [slice(i, i + 1) for i in range(8)]
    assert _batch_blocks(torch.empty(8, 16, 128, 128)) == [slice(0, 2), slice(2, 4),
                                                           slice(4, 6), slice(6, 8)]
    assert _batch_blocks(torch.empty(8, 64, 32, 32)) == [slice(0, 8)]
    assert _batch_blocks(torch.empty(8, 8, 256, 256, device="meta")) == [slice(0, 8)]


@pytest.mark.parametrize("block_bytes", [1, 2 << 20])
def test_blocked_loops_match_the_reference_in_values_and_gradients(monkeypatch, block_bytes):
    """One sample a block (block_bytes=1) and the whole batch in one: the training path
    (values, gradcheck), the eager inference path and the traced functional form agree."""
    import cellseg_plugins.local_attention as la
    monkeypatch.setattr(la, "_CPU_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    args = [torch.randn(3, c, 5, 6, dtype=torch.float64, requires_grad=True) for c in (2, 2, 3)]
    expected = reference_local_attention(*args, 3)
    assert torch.allclose(local_attention(*args, 3), expected)
    assert torch.autograd.gradcheck(lambda q, k, v: local_attention(q, k, v, 3), args)
    with torch.no_grad():
        assert torch.allclose(local_attention(*args, 3), expected)
        assert torch.allclose(la.local_attention_functional(*args, 3), expected)


@pytest.mark.parametrize("grad", [False, True])
def test_channels_last_inputs_give_the_same_values_and_gradients_in_their_layout(grad):
    """Both paths (functional without gradient, custom autograd with) copy channels-last
    inputs to NCHW and give the output back channels-last, with the NCHW values and
    gradients."""
    torch.manual_seed(0)
    nchw = [torch.randn(2, c, 6, 7, dtype=torch.float64) for c in (3, 3, 4)]
    last = [t.contiguous(memory_format=torch.channels_last) for t in nchw]
    for t in nchw + last:
        t.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        a, b = local_attention(*nchw, 5), local_attention(*last, 5)
    assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    assert torch.allclose(a, reference_local_attention(*nchw, 5)) and torch.equal(a, b)
    if grad:
        g = torch.randn_like(a)
        grads = [torch.autograd.grad(out, inputs, g) for out, inputs in ((a, nchw), (b, last))]
        assert all(torch.equal(x, y) for x, y in zip(*grads))


@pytest.mark.parametrize("query", ["encoder", "decoder"])
@pytest.mark.parametrize("residual", ["encoder", "decoder", "none"])
def test_lfa_module_matches_reference(query, residual):
    torch.manual_seed(0)
    module = LocalFeatureAggregation(8, 8, 3, query, residual, reduction=4)
    skip, decoder = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)
    up = torch.nn.functional.interpolate(decoder, size=(6, 6), mode="nearest")
    src, tgt = (skip, up) if query == "encoder" else (up, skip)
    y = reference_local_attention(module.f_q(src), module.f_k(tgt), module.f_v(tgt), 3)
    expected = {"encoder": y + skip, "decoder": y + up, "none": y}[residual]
    assert torch.allclose(module(decoder, skip), expected, atol=1e-5)


def lfa_modules(model):
    return [m for m in model.modules() if isinstance(m, LocalFeatureAggregation)]


def test_lfa_sits_on_every_skip_of_the_classic_unet():
    model = cs.create_model("unet(encoder='plain8')+lfa(m=7)")
    # four skips (8, 16, 32, 64 channels) including the full-resolution top skip, as in the paper
    assert sorted(m.f_v.out_channels for m in lfa_modules(model)) == [8, 16, 32, 64]
    only = cs.create_model("unet(encoder='plain8')+lfa(stages=[0,3])")
    assert sorted(m.f_v.out_channels for m in lfa_modules(only)) == [8, 64]
    with pytest.raises(cs.SpecError, match="matches no skip"):
        cs.create_model("unet(encoder='plain8')+lfa(stages=[9])")
    with pytest.raises(cs.SpecError) as err:  # one stage that exists does not hide one that not
        cs.create_model("classic_unet(width=4)+lfa(stages=(1,4))")
    assert str(err.value).endswith("stages=[1, 4]: 4 matches no skip of this model; its skips "
                                   "are at stages 0, 1, 2, 3 (the encoder feature index: "
                                   "stride 2**stage)"), str(err.value)
    assert "\n" not in str(err.value)
    resnet = cs.create_model("unet(encoder='resnet18')+lfa(stages=[1])")  # stride 2 on smp
    assert [m.f_v.out_channels for m in lfa_modules(resnet)] == [64]


def test_lfa_changes_output_and_trains():
    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='resnet18')+lfa(m=5)", classes=3)
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    for m in lfa_modules(model):
        assert m.f_q.weight.grad is not None and m.f_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spec, normalised", [
    ("fpn(encoder='resnet18')+lfa", True),  # auto: FPN's top-down feature is not normalised
    ("linknet(encoder='resnet18')+lfa", True),  # nor Linknet's: x = block(x) + skip
    ("unet(encoder='resnet18')+lfa", False), ("classic_unet(width=4)+lfa", False),
    ("upernet(encoder='resnet18')+lfa", False),  # its lateral path normalises Y + P
    ("upernet(encoder='resnet18',decoder_use_norm=False)+lfa", True),  # ... unless told not to
    ("unet(encoder='resnet18',decoder_use_norm=False)+lfa", True),
    ("fpn(encoder='resnet18')+lfa(decoder_norm='none')", False),
    ("unet(encoder='resnet18')+lfa(decoder_norm='batch')", True)])
def test_decoder_norm_sits_where_the_decoder_feature_is_not_normalised(spec, normalised):
    modules = lfa_modules(cs.create_model(spec))
    assert modules and all(isinstance(m.norm, torch.nn.BatchNorm2d) == normalised
                           for m in modules)


@pytest.mark.parametrize("decoder_norm", [True, False])
def test_decoder_norm_normalises_what_keys_and_values_see(decoder_norm):
    """With the BatchNorm on Q, f_k and f_v see Q with zero mean and unit variance per channel,
    and the output no longer scales with Q (what let FPN + LFA grow Q level after level)."""
    torch.manual_seed(0)
    module = LocalFeatureAggregation(8, 6, 3, "encoder", "encoder", 4, decoder_norm)
    seen = []
    module.f_v.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    skip, decoder = torch.randn(4, 8, 6, 6), 50 + 30 * torch.randn(4, 6, 3, 3)
    out = module(decoder, skip)
    mean, std = seen[0].mean((0, 2, 3)), seen[0].std((0, 2, 3))
    assert torch.allclose(mean, torch.zeros(6), atol=1e-4) == decoder_norm
    assert torch.allclose(std, torch.ones(6), atol=0.05) == decoder_norm
    assert torch.allclose(module(1000 * decoder, skip), out, atol=1e-3) == decoder_norm


def test_transformer_placeholder_skip_is_left_alone():
    model = cs.create_model("unet(encoder='mit_b0')+lfa(m=3)", classes=2)
    chans = list(model.encoder.out_channels)
    assert 0 in chans
    assert len(lfa_modules(model)) == sum(c > 0 for c in chans[1:-1])
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2, 64, 64)


@pytest.mark.parametrize("arch", ["pspnet", "deeplabv3", "segformer", "dpt"])
@pytest.mark.parametrize("plugin", ["lfa", "attention_gate"])
def test_skip_plugins_refuse_archs_without_skips(arch, plugin):
    with pytest.raises(cs.SpecError) as err:
        cs.create_model(f"{arch}+{plugin}")
    assert "it supports: classic_unet, deeplabv3plus, fpn, linknet, manet, pan, unet, unetplusplus, upernet" in str(err.value)


def test_even_window_is_refused():
    with pytest.raises(cs.SpecError, match="m=4: the window size must be odd"):
        cs.create_model("unet+lfa(m=4)")
