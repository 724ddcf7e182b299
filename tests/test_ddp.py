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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "cellseg_plugins.cli.main", "train"]
LAUNCH = [sys.executable, "-m", "cellseg_plugins.cli.main", "train", "--nproc-per-node", "2"]


def train(out, spec, batch, *extra, launcher=TORCHRUN):
    """Two processes (under torchrun, or launched by ``cellseg train --nproc-per-node 2``),
    each with half the batch."""
    proc = subprocess.run([*launcher, spec, "--out", str(out), "--batch-size", str(batch),
                           *ARGS, *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(out / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("spec, layout, launcher", [
    # smp, BatchNorm encoder; NCHW: in channels-last the stem convolution's weight gradient
    # (a sum over 32 × 128² pixels) is reduced in another order and drifts 3e-4 in two steps
    ("unet(encoder='plain4')+lfa(m=3)", "--no-channels-last", TORCHRUN),
    ("classic_unet(width=4)+feedback_convlstm", "--channels-last", LAUNCH)],  # the default
    ids=["torchrun", "nproc-per-node"])
def test_two_processes_equal_one_with_the_combined_batch(tmp_path, capsys, spec, layout,
                                                         launcher):
    ddp = train(tmp_path / "ddp", spec, 16, layout, launcher=launcher)
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


def test_nproc_per_node_is_checked_before_any_process_starts(tmp_path, capsys, monkeypatch):
    """A bad spec or option is one line from the launching process, not one per process; so
    are more processes than GPUs and a launch from inside torchrun."""
    from cellseg_plugins.engine import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda *a: launched.append(a) or 0)
    out = ["--out", tmp_path / "run", "--nproc-per-node", "2"]
    for args, message in [
            (["unet+nosuch"], "unknown name 'nosuch'"),
            (["unet", "--optimizer", "bogus"], "--optimizer 'bogus': expected one of adam, sgd"),
            (["unet", "--nproc-per-node", "0"], "'--nproc-per-node': Input should be greater")]:
        code, _, err = cli(capsys, "train", *out, *args)  # the last --nproc-per-node counts
        assert code == 2 and err.count("\n") == 1 and message in err, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = cli(capsys, "train", "unet", "--device", "cuda", *out)
    assert code == 2 and "--nproc-per-node 2: this machine has 1 GPU(s)" in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(capsys, "train", "unet", "--device", "cpu", *out)
    assert code == 2 and "one of torchrun's already" in err, err
    assert launched == [] and not (tmp_path / "run").exists()

    monkeypatch.delenv("WORLD_SIZE")  # the same command again, --nproc-per-node left out
    code, _, err = cli(capsys, "train", "unet", "--nproc-per-node", "3", "--device", "cpu",
                       "--nproc-per-node=2", "--epochs", "1", "--out", tmp_path / "run")
    assert code == 0 and launched == [(["train", "unet", "--device", "cpu", "--epochs", "1",
                                         "--out", str(tmp_path / "run")], 2)]


def _children(pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes ``pid`` started (Linux /proc)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
                rank = [v.split(b"=", 1)[1] for v in env if v.startswith(b"RANK=")]
                ranks[int(rank[0])] = int(entry)
        except (OSError, IndexError, ValueError):
            continue
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the processes in /proc")
def test_a_process_killed_during_training_is_one_line_not_torchruns_traceback(tmp_path):
    """The kernel's out-of-memory killer takes rank 1: the launcher says so on one line, rank
    0 that it lost touch, with no traceback (torchrun prints a page of them); the files are
    whole, so --resume goes on."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([*LAUNCH, "classic_unet(width=4)", "--epochs", "200", "--crop",
                             "64", "--device", "cpu", "--out", str(out)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(_children(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "error: training process 1 of 2 was killed by SIGKILL" in err
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    assert load_checkpoint(out / "last.pt")["step"] > 0
