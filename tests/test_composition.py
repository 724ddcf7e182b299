"""Any two plugins combine (in either order) on one model, or refuse in one line."""

import itertools
import warnings

import pytest
import torch

import cellseg_plugins as cs

PLUGINS = ["frem", "lfa(m=3)", "attention_gate", "bottleneck_attention", "bottleneck_supervision",
           "bottleneck_dropout", "scse", "feedback_self", "feedback_st", "feedback_convlstm",
           "feedback_attention(connection='conv')"]


@pytest.mark.parametrize("first, second", list(itertools.permutations(PLUGINS, 2)))
def test_pair(first, second):
    spec = f"unet(encoder='resnet18')+{first}+{second}"
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
