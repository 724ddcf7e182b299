"""Every plugin builds and trains one step on every arch it supports; others refuse in one line."""

import pytest
import torch

import cellseg_plugins as cs
from cellseg_plugins.registry import get_entry
from conftest import MIN_SIZE, grid_plugins, small_spec

PLUGINS = grid_plugins()


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("arch", cs.list_archs())
def test_plugin_on_arch(plugin, arch):
    name = plugin.split("(")[0]
    spec = f"{small_spec(arch)}+{plugin}"
    if not get_entry(name).supports_arch(arch):
        with pytest.raises(cs.SpecError) as err:
            cs.create_model(spec)
        assert "does not support arch" in str(err.value) and "\n" not in str(err.value)
        return
    size = MIN_SIZE.get(arch, 64)
    model = cs.create_model(spec, classes=3).train()
    x, y = torch.randn(2, 1, size, size), torch.randint(0, 3, (2, size, size))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cs.epoch_start(model, 0)
    loss = criterion(model(x), y)
    aux, parts = cs.auxiliary_loss(model, y, criterion)
    (loss + aux).backward()
    optimizer.step()
    assert torch.isfinite(loss)
    if name == "bottleneck_supervision":
        assert set(parts) == {"bottleneck_supervision"} and aux > 0
    model.eval()
    assert model(x).shape == (2, 3, size, size)


def test_bottleneck_supervision_weight_reaches_the_loss():
    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain8')+bottleneck_supervision(lam=0.5)", classes=3)
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    model(x)
    total, parts = cs.auxiliary_loss(model, y, criterion)
    assert torch.isclose(total, torch.tensor(0.5 * parts["bottleneck_supervision"]))
    model.eval()
    model(x)
    assert cs.auxiliary_loss(model, y, criterion) == (0.0, {})  # nothing in eval mode


def decoder_inputs(model, x):
    """The arguments the decoder receives for input ``x`` (eval mode)."""
    seen = []
    handle = model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0]


def test_bottleneck_plugins_reach_dpt_last_feature_and_keep_its_tokens():
    """DPT's encoder returns (features, prefix tokens): a bottleneck transform changes the last
    feature, the decoder still gets the tokens, and features 0–2 pass unchanged."""
    from cellseg_plugins.hooks import transform_encoder_features

    torch.manual_seed(0)
    model = cs.create_model(small_spec("dpt"), classes=3)
    x = torch.randn(1, 1, 64, 64)
    features, tokens = decoder_inputs(model, x)
    transform_encoder_features(model, "test_zero", {-1: ZeroTimes()})
    changed, changed_tokens = decoder_inputs(model, x)
    assert len(changed) == 4 and torch.equal(changed[-1], torch.zeros_like(features[-1]))
    assert all(torch.equal(a, b) for a, b in zip(changed[:3], features[:3]))
    assert all(torch.equal(a, b) for a, b in zip(changed_tokens, tokens))
    frem = cs.create_model(small_spec("dpt") + "+frem", classes=3)
    assert list(frem.frem.transforms) == ["3"]  # the last of DPT's four features


class ZeroTimes(torch.nn.Module):
    def forward(self, x):
        return x * 0


def test_scse_recalibrates_every_strided_encoder_feature():
    """scSE goes on features of stride ≥ 2: all of DPT's (stride 16), not the input image or a
    plain encoder's full-resolution stem."""
    from cellseg_plugins.hooks import encoder_strides

    dpt = cs.create_model(small_spec("dpt"), classes=3)
    assert encoder_strides(dpt) == [16, 16, 16, 16]
    unet = cs.create_model("unet(encoder='plain8')", classes=3)
    assert encoder_strides(unet) == [1, 2, 4, 8, 16]
    assert list(cs.apply_plugins(dpt, "scse").scse_encoder.transforms) == ["0", "1", "2", "3"]
    assert list(cs.apply_plugins(unet, "scse").scse_encoder.transforms) == ["1", "2", "3", "4"]


@pytest.mark.parametrize("arch, places", [
    ("unet", {"e1": "1", "e2": "2", "bottleneck": "5"}),  # feature 0 is the input image
    ("dpt", {"e1": "0", "e2": "1", "bottleneck": "3"}),   # all four are ViT features
])
def test_convlstm_encoder_places_skip_only_the_input_image(arch, places):
    model = cs.create_model(f"{small_spec(arch)}+feedback_convlstm(mode='add')", classes=3)
    assert {name: list(getattr(model, f"convlstm_{name}").transforms)[0]
            for name in places} == places
