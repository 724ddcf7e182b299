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
