"""Multi-process training (torchrun, gloo on CPU) equals one process with the combined batch."""

import os
import subprocess
import sys

import pytest
import torch

from cellseg_plugins.engine.checkpoint import load_checkpoint
from conftest import cli

# One epoch of 48 crops of 128²: two steps (32 + 16 crops, or 2 × (16 + 8)). Float reductions
# run in another order with another batch size, so the runs drift apart by float noise that
# SGD amplifies step by step: two steps keep it far below a real difference.
ARGS = ["--epochs", "1", "--crop", "128", "--optimizer", "sgd", "--lr", "0.01", "--device", "cpu"]


def train(out, spec, batch, *extra):
    """Two processes under torchrun, each with half the batch."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "cellseg_plugins.cli.main", "train",
                           spec, "--out", str(out), "--batch-size", str(batch), *ARGS, *extra],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(out / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("spec, layout", [
    # smp, BatchNorm encoder; NCHW: in channels-last the stem convolution's weight gradient
    # (a sum over 32 × 128² pixels) is reduced in another order and drifts 3e-4 in two steps
    ("unet(encoder='plain4')+lfa(m=3)", "--no-channels-last"),
    ("classic_unet(width=4)+feedback_convlstm", "--channels-last")])  # train's default layout
def test_two_processes_equal_one_with_the_combined_batch(tmp_path, capsys, spec, layout):
    ddp = train(tmp_path / "ddp", spec, 16, layout)
    code, _, err = cli(capsys, "train", spec, "--out", tmp_path / "one", "--batch-size", "32",
                       *ARGS, layout)  # one process: this one
    assert code == 0, err
    one = load_checkpoint(tmp_path / "one" / "last.pt")
    assert ddp["step"] == one["step"] == 2 and 0 <= ddp["history"][0]["val_miou"] <= 1
    assert not any(k.startswith("module.") for k in ddp["model"])  # saved unwrapped
    assert len((tmp_path / "ddp" / "metrics.csv").read_text().splitlines()) == 2  # rank 0 wrote once
    worst = max(float(((ddp["model"][k].double() - one["model"][k].double()).abs()
                       / one["model"][k].double().abs().clamp(min=1)).max())
                for k in one["model"] if one["model"][k].is_floating_point())
    assert worst < 1e-4, worst
    changed = max(float((one["model"][k] - torch.zeros_like(one["model"][k])).abs().max())
                  for k in one["model"] if k.endswith("running_var"))
    assert changed > 0  # BatchNorm statistics were trained, and agree


@pytest.mark.parametrize("plugin", ["", "+lfa(m=3)", "+feedback_convlstm", "+feedback_self",
                                    "+bottleneck_supervision", "+frem", "+scse"])
def test_ddp_needs_no_unused_parameter_search_for_the_plugins(plugin):
    import cellseg_plugins as cs
    from cellseg_plugins.engine.distributed import unused_parameters

    model = cs.create_model(f"classic_unet(width=4){plugin}", classes=3)
    assert unused_parameters(model, 1, 3, 32) == []
    model.spare = torch.nn.Conv2d(1, 1, 1)  # a module the forward never calls
    assert unused_parameters(model, 1, 3, 32) == ["spare.weight", "spare.bias"]
