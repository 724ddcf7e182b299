"""Any two plugins combine (in either order) on one model, or refuse in one line."""

import itertools
import warnings

import pytest
import torch

import cellseg_plugins as cs
from conftest import grid_plugins

PLUGINS = grid_plugins()


@pytest.mark.parametrize("first, second", list(itertools.permutations(PLUGINS, 2)))
def test_pair(first, second):
    spec = f"unet(encoder='plain4')+{first}+{second}"
    if first.startswith("feedback") and second.startswith("feedback"):
        with pytest.raises(cs.SpecError, match="cannot be combined"):
            cs.parse_spec(spec)
        return
    warnings.simplefilter("ignore")
    model = cs.create_model(spec, classes=3).train()
    y = torch.randint(0, 3, (2, 64, 64))
    criterion = torch.nn.CrossEntropyLoss()
    loss = criterion(model(torch.randn(2, 1, 64, 64)), y)
    aux, _ = cs.auxiliary_loss(model, y, criterion)
    (loss + aux).backward()
    assert torch.isfinite(loss)
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugin_trains_under_autocast(plugin):
    """Mixed precision (bf16 autocast on CPU stands in for --precision bf16 on CUDA): dtypes meet, loss finite."""
    warnings.simplefilter("ignore")
    model = cs.create_model(f"unet(encoder='resnet18')+{plugin}", classes=3).train()
    y = torch.randint(0, 3, (2, 64, 64))
    criterion = torch.nn.CrossEntropyLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cs.training_loss(model, torch.randn(2, 1, 64, 64), y,
                                lambda a, b: criterion(a.float(), b))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
