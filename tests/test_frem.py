import pytest
import torch

import cellseg_plugins as cs
from cellseg_plugins.plugins.frem import FeatureRandomEnhancement

SPEC = "unet(encoder='plain8')"


def frem_module(model):
    return next(m for m in model.modules() if isinstance(m, FeatureRandomEnhancement))


def test_eval_output_is_bit_identical_to_the_model_without_frem():
    torch.manual_seed(0)
    with_frem = cs.create_model(SPEC + "+frem(B=8,X=250)", classes=5)
    plain = cs.create_model(SPEC, classes=5)
    state = {k: v for k, v in with_frem.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state)
    x = torch.randn(2, 1, 64, 64)
    with_frem.eval(), plain.eval()
    assert torch.equal(with_frem(x), plain(x))


def test_eval_costs_nothing_and_training_scales_b_channels():
    module = FeatureRandomEnhancement(16, B=3, X=250.0, per="epoch", fixed=False,
                                      at_test=False, seed=0)
    x = torch.rand(2, 16, 4, 4) + 0.1
    module.eval()
    assert module(x) is x  # the same tensor: no copy, no arithmetic
    module.train()
    ratio = (module(x) / x).amax(dim=(0, 2, 3))
    assert sorted(torch.nonzero(ratio > 1).flatten().tolist()) == sorted(module.selected.tolist())
    assert torch.allclose(ratio[module.selected], torch.tensor(250.0))
    assert (ratio > 1).sum() == 3


def test_channels_redrawn_per_epoch_per_batch_or_fixed():
    def draws(per, fixed, hook):
        m = FeatureRandomEnhancement(512, 8, 250.0, per, fixed, False, seed=1)
        out = []
        for t in range(4):
            getattr(m, hook)(t)
            out.append(tuple(sorted(m.selected.tolist())))
        return out

    assert len(set(draws("epoch", False, "on_epoch_start"))) == 4
    assert len(set(draws("epoch", False, "on_step_start"))) == 1  # steps do not re-draw
    assert len(set(draws("batch", False, "on_step_start"))) == 4
    assert len(set(draws("epoch", True, "on_epoch_start"))) == 1
    assert draws("epoch", False, "on_epoch_start") == draws("epoch", False, "on_epoch_start")


def test_epoch_callback_reaches_frem_through_the_protocol():
    model = cs.create_model(SPEC + "+frem(seed=3)")
    module = frem_module(model)
    before = module.selected.clone()
    cs.epoch_start(model, 5)
    assert not torch.equal(before, module.selected)


def test_the_hooks_take_the_models_plugin_list_as_they_take_the_model():
    """The engine lists the plugin modules once an epoch and passes the list: the same
    modules get the callbacks (FREM's per-batch draw), and training_loss counts the same
    loss, deep supervision's included and popped, as when each call walks the model."""
    model = cs.create_model(
        "classic_unet(width=4)+frem(B=4,per='batch',seed=3)+bottleneck_supervision")
    plugins = cs.plugin_modules(model)
    assert plugins == [m for m in model.modules() if isinstance(m, cs.PluginModule)]
    assert frem_module(model) in plugins
    model.train()
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 5, (2, 32, 32))
    losses, drawn = [], []
    for hooks in (model, plugins):
        cs.step_start(hooks, 7)
        drawn.append(frem_module(model).selected.clone())
        torch.manual_seed(0)
        losses.append(cs.training_loss(model, x, y, torch.nn.functional.cross_entropy,
                                       plugins=None if hooks is model else plugins))
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(losses[0], losses[1])
    assert cs.auxiliary_loss(model, y, torch.nn.functional.cross_entropy) == (0.0, {})  # popped


def test_at_test_enhances_in_eval_mode():
    torch.manual_seed(0)
    model = cs.create_model(SPEC + "+frem(at_test=True)").eval()
    x = torch.randn(1, 1, 32, 32)
    y1 = model(x)
    frem_module(model).at_test = False
    assert not torch.equal(y1, model(x))


def test_b_larger_than_bottleneck_is_a_one_line_error():
    with pytest.raises(cs.SpecError) as err:
        cs.create_model(SPEC + "+frem(B=200)")
    assert "B=200 is larger than the bottleneck's 128 channels" in str(err.value)
    assert "\n" not in str(err.value)
