import copy
import json
import re
from typing import Annotated, Literal

import pytest
import segmentation_models_pytorch as smp
import torch

import cellseg_plugins as cs
from cellseg_plugins.registry import get_entry
from conftest import MIN_SIZE, small_spec

SMP_ARCHS = ["deeplabv3", "deeplabv3plus", "dpt", "fpn", "linknet", "manet", "pan", "pspnet",
             "segformer", "unet", "unetplusplus", "upernet"]


def test_every_smp_arch_is_registered():
    assert cs.list_archs() == sorted([*SMP_ARCHS, "classic_unet"])
    assert cs.list_archs("*net*") == ["classic_unet", "linknet", "manet", "pspnet", "unet", "unetplusplus", "upernet"]
    assert "scse" in cs.list_plugins()
    assert cs.list_plugins("zzz*") == []


def test_schema_is_read_from_signature():
    entry = get_entry("scse")
    p = entry.param("reduction")
    assert (p.name, p.type_name, p.default, p.range.lo, p.range.hi) == ("reduction", "int", 16, 1, 1024)
    assert entry.param("where").choices == ("encoder", "decoder", "both")
    unet = get_entry("unet")
    assert unet.param("encoder").default == "resnet34"
    assert unet.param("encoder_weights").default is None  # offline-safe


def test_register_plugin_decorator_and_removal():
    @cs.register_plugin("test_scale", supports=["unet"])
    def test_scale(model, factor: Annotated[float, cs.Range(0, 10)] = 2.0,
                   mode: Literal["a", "b"] = "a"):
        """Multiply the logits by a factor."""
        return model

    try:
        entry = get_entry("test_scale")
        assert entry.description == "Multiply the logits by a factor."
        assert [p.name for p in entry.params] == ["factor", "mode"]
        assert str(cs.parse_spec("unet+test_scale(factor=3)")) == "unet+test_scale(factor=3.0)"
        with pytest.raises(cs.SpecError, match="does not support arch 'fpn'"):
            cs.parse_spec("fpn+test_scale")
        with pytest.raises(ValueError, match="already registered"):
            cs.register_plugin("test_scale")(test_scale)
    finally:
        cs.registry.unregister("test_scale")


@pytest.mark.parametrize("added, message", [
    ({"depth": ("none", "x")}, "names 'depth', which is not one of its parameters"),
    ({"mode": ("a", "(")}, "missing \\)")])
def test_register_plugin_refuses_bad_added_params(added, message):
    def plugin(model, mode: Literal["a", "b"] = "b"):
        return model

    with pytest.raises((ValueError, re.error), match=message):
        cs.register_plugin("test_added", added_params=added)(plugin)
    assert get_entry("test_added") is None


@pytest.mark.parametrize("arch", SMP_ARCHS)
def test_every_arch_builds_and_trains(arch):
    size = MIN_SIZE.get(arch, 64)
    model = cs.create_model(small_spec(arch), in_channels=1, classes=3)
    model.train()
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 3, size, size)
    out.mean().backward()
    for part in (model.decoder, model.segmentation_head):
        assert all(p.grad is not None for p in part.parameters())
    # (smp's DPT leaves timm's final norm and classifier unused, so no "all" for encoders)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert model.cellseg_spec == str(cs.parse_spec(small_spec(arch)))


def test_fpn_quick_start():
    model = cs.create_model("fpn", in_channels=1, classes=5)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5, 64, 64)


def test_plain_encoder_builds_classic_unet():
    model = cs.create_model("unet(encoder='plain8')", in_channels=1, classes=5)
    assert list(model.encoder.out_channels) == [8, 16, 32, 64, 128]
    feats = model.encoder(torch.randn(1, 1, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 32), (16, 16, 16), (32, 8, 8),
                                                   (64, 4, 4), (128, 2, 2)]
    # The last decoder block receives the full-resolution top skip (16 upsampled + 8 skip).
    assert model.decoder.blocks[-1].conv1[0].in_channels == 24
    seen = {}
    model.decoder.blocks[-1].register_forward_pre_hook(
        lambda m, a, k: seen.update(skip=k["skip_connection"]), with_kwargs=True)
    model.eval()
    model(torch.randn(1, 1, 32, 32))
    assert seen["skip"].shape == (1, 8, 32, 32)
    big = cs.create_model("unet(encoder='plain')")
    assert list(big.encoder.out_channels) == [64, 128, 256, 512, 1024]


def test_overrides_and_errors():
    model = cs.create_model("unet", encoder="resnet18", encoder_depth=3,
                            decoder_channels=[32, 16, 8])
    assert model.cellseg_spec == "unet(encoder='resnet18',encoder_depth=3,decoder_channels=[32,16,8])"
    with pytest.raises(cs.SpecError, match="unknown encoder 'resnet99'; did you mean"):
        cs.create_model("unet(encoder='resnet99')")
    with pytest.raises(cs.SpecError, match="decoder_channels"):
        cs.create_model("unet(encoder_depth=3)")
    for kwargs, text in ((dict(classes=0), "classes=0: expected an int ≥ 1"),
                         (dict(in_channels=0), "in_channels=0: expected an int ≥ 1"),
                         (dict(classes="3"), "classes='3': expected an int ≥ 1"),
                         (dict(in_channels=2.5), "in_channels=2.5: expected an int ≥ 1")):
        with pytest.raises(cs.PluginConfigError) as err:  # not torch's error, or a 0-class head
            cs.create_model("unet(encoder='plain8')", **kwargs)
        assert str(err.value) == text


@pytest.mark.parametrize("spec", ["unet(encoder='resnet18',decoder_use_norm='instancenorm')",
                                  "unet(encoder='plain8',decoder_use_norm='InstanceNorm')",
                                  "manet(encoder='resnet18',decoder_use_norm='instancenorm')"])
def test_instancenorm_decoder_builds_and_learns(spec):
    """smp 0.6 crashes building 'instancenorm' (its initializer fills weights the norm lacks);
    cellseg builds it with affine weights, which train like batchnorm's."""
    model = cs.create_model(spec, in_channels=1, classes=3)
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())
    assert all(n.affine and torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)
    model(torch.randn(2, 1, 64, 64)).logsumexp(1).mean().backward()
    assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in norms)


def test_smp_failure_while_building_is_one_line():
    from cellseg_plugins.archs import build_smp
    from cellseg_plugins.errors import PluginConfigError

    class Broken(smp.Unet):
        def initialize(self):
            raise AttributeError("'NoneType' object has no attribute 'fill_'")

    with pytest.raises(PluginConfigError, match=r"^smp.Broken could not be built with "
                       r"\{'encoder_depth': 3, 'decoder_channels': \[32, 16, 8\]\} "
                       r"\(AttributeError: 'NoneType' object has no attribute 'fill_'\)$"):
        build_smp(Broken, 1, 2, encoder="resnet18", encoder_depth=3, decoder_channels=[32, 16, 8])


def test_pretrained_weights_offline_error(monkeypatch):
    import segmentation_models_pytorch.encoders as enc

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(enc, "hf_hub_download", offline)
    with pytest.raises(cs.SpecError, match="could not fetch encoder_weights='imagenet'.*offline"):
        cs.create_model("unet(encoder='resnet18',encoder_weights='imagenet')")


def test_local_weights_file(tmp_path):
    source = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=2)
    path = tmp_path / "enc.pth"
    torch.save(source.encoder.state_dict(), path)
    model = cs.create_model(f"unet(encoder='resnet18',encoder_weights={str(path)!r})", classes=2)
    for a, b in zip(source.encoder.state_dict().values(), model.encoder.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(cs.SpecError, match="does not fit encoder"):
        cs.create_model(f"unet(encoder='resnet34',encoder_weights={str(path)!r})")
    with pytest.raises(cs.SpecError, match="does not exist"):
        cs.create_model(f"unet(encoder_weights={str(tmp_path / 'nope.pth')!r})")


def test_apply_plugins_on_user_model():
    model = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=5)
    reference = copy.deepcopy(model).eval()
    cs.apply_plugins(model, "scse(reduction=4)")
    n_new = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reference.parameters())
    assert n_new > 0
    model.eval()
    x = torch.randn(1, 1, 64, 64)
    assert model(x).shape == (1, 5, 64, 64)
    assert not torch.allclose(model(x), reference(x))
    with pytest.raises(cs.SpecError, match="plugins only"):
        cs.apply_plugins(model, "unet+scse")


def test_apply_plugins_again_follows_the_specs_rules():
    """apply_plugins on a model that has plugins already added a second LFA (its weights
    too) and let a second two-round plugin wrap the first: now refused as the spec refuses
    'lfa+lfa', naming the plugin the model has; a create_model'd model's spec gains what is
    added, and the model rebuilds from it."""
    def unet():
        return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=2)

    for first, then, message in (
            ("lfa", "lfa", "plugin 'lfa' may appear only once; the model has 'lfa' already"),
            ("frem+feedback_self", "scse+feedback_convlstm",
             "plugin 'feedback_convlstm' cannot be combined with 'feedback_self' (both are "
             "rounds plugins); the model has 'feedback_self' already")):
        model = cs.apply_plugins(unet(), first)
        size = sum(p.numel() for p in model.parameters())
        with pytest.raises(cs.SpecError, match=re.escape(message)):
            cs.apply_plugins(model, then)
        assert sum(p.numel() for p in model.parameters()) == size  # nothing half-applied
    model = cs.apply_plugins(cs.create_model("unet(encoder='resnet18')+lfa", classes=2),
                             "scse(reduction=4)")
    assert model.cellseg_spec == "unet(encoder='resnet18')+lfa+scse(reduction=4)"
    assert model.cellseg_plugins == ("lfa", "scse")
    rebuilt = cs.create_model(model.cellseg_spec, classes=2)
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert cs.apply_plugins(unet(), "lfa+scse").cellseg_plugins == ("lfa", "scse")


def test_apply_plugins_refuses_unsupported_model():
    model = smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, in_channels=1, classes=2,
                    img_size=64)
    with pytest.raises(cs.SpecError, match="does not support arch 'dpt'"):
        cs.apply_plugins(model, "attention_gate")


def test_deepcopy_keeps_hooks_local():
    model = cs.create_model("unet(encoder='plain8')+scse", classes=2).eval()
    clone = copy.deepcopy(model)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(model(x), clone(x))
    with torch.no_grad():
        for p in clone.scse_decoder.parameters():
            p.add_(1.0)
    assert not torch.equal(model(x), clone(x))


def test_registry_json_is_serialisable():
    data = {e.name: e.to_json() for e in cs.registry.all_entries()}
    assert json.loads(json.dumps(data))["scse"]["supports"][0] == "classic_unet"


def test_hub_weights_offline_fail_fast_in_one_line(monkeypatch, capsys):
    """No network (simulated, so that a machine with one downloads nothing): one line, no
    retries, and the way to pass a local file."""
    import time

    import cellseg_plugins.archs as archs
    from cellseg_plugins.cli.main import main

    monkeypatch.setattr(archs, "hub_reachable", lambda timeout=1.5: False)
    for spec in ("unet(encoder='resnet18',encoder_weights='imagenet')",
                 "unet(encoder='tu-resnet18',encoder_weights=True)"):
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            main(["bench", spec])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Retry" not in err
        assert "encoder_weights='/path/to/" in err and "unreachable" in err
        assert time.perf_counter() - t0 < 10
