"""--compile: every plugin traces through torch.compile to the eager step; failures are one line.

The per-plugin test compiles with the ``aot_eager`` backend (Dynamo's tracing and AOTAutograd's
functionalised forward and backward, what can break on a plugin's hooks, rounds and custom
autograd), not inductor's code generation, which takes 25-100 s a model on 2 cores; inductor
itself is covered by docs/performance.md's measurements.
"""

import copy
import functools
import json
import re

import pytest
import torch

from cellseg_plugins.registry import create_model, epoch_start, step_start, training_loss
from cellseg_plugins.registry.registry import list_plugins
from conftest import EVERY_PLUGIN, FAST, TINY, cli


def _step(net, x, y) -> torch.Tensor:
    """One training step's loss and gradients (seeded: FREM and dropout draw the same)."""
    torch.manual_seed(0)
    net.train()
    epoch_start(net, 0)
    step_start(net, 0)
    loss = training_loss(net, x, y, torch.nn.functional.cross_entropy)
    loss.backward()
    return loss.detach()


COMPILE = torch.compile


def test_the_compiled_and_exported_models_cover_every_plugin():
    covered = {name for spec in EVERY_PLUGIN for name in re.findall(r"\+(\w+)", spec)}
    assert covered == set(list_plugins())


@pytest.mark.parametrize("spec", EVERY_PLUGIN)
def test_every_plugin_compiles_to_the_eager_training_step(spec):
    """In float64: the model of LFA, attention gates, scSE and bottleneck attention has
    gradients that fp32 rounding alone moves by up to 21 % (BatchNorm over the attention gates'
    one-channel maps divides small sums by a small deviation), so an fp32 comparison would
    test the rounding order of the two LFA backward paths (custom and compiled), not the
    compiled graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(spec, in_channels=1, classes=3).double()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 64, 64))
    eager = _step(model, x, y)
    compiled = _step(COMPILE(twin, backend="aot_eager"), x, y)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6), (compiled, eager)
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(),
                                                       twin.parameters())]
    assert any(g is not None for _, g, _ in grads)
    for name, g, h in grads:  # the same parameters get the same gradients
        assert (g is None) == (h is None), name
        if g is not None:
            assert torch.allclose(h, g, rtol=1e-4, atol=1e-6), name


def _aot_eager(calls, model, **kw):
    calls.append(kw)
    return COMPILE(model, backend="aot_eager")


def _broken(gm, example_inputs):
    raise RuntimeError("no kernel for this op\nsecond line")


def test_a_model_that_does_not_compile_stops_in_one_line(tmp_path, capsys, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: torch._dynamo.optimize(_broken)(model))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, "--epochs", "1", "--out", out, "--compile", *FAST)
    line = err.strip().splitlines()[-1]
    assert code == 2 and err.count("error:") == 1 and line.startswith("error:"), err
    assert line == ("error: --compile: \"unet(encoder='plain4')\" does not compile (RuntimeError: "
                    "no kernel for this op); train it without --compile")
    assert not (out / "last.pt").exists()


def test_compile_mode_needs_compile(tmp_path, capsys):
    code, _, err = cli(capsys, "train", TINY, "--compile-mode", "reduce-overhead",
                       "--out", tmp_path / "run", *FAST)
    assert code == 2 and err.count("\n") == 1
    assert "--compile-mode 'reduce-overhead': needs --compile" in err
    code, _, err = cli(capsys, "train", TINY, "--compile", "--compile-mode", "fast",
                       "--out", tmp_path / "run", *FAST)
    assert code == 2 and "expected one of default, reduce-overhead, max-autotune" in err
    assert not (tmp_path / "run").exists()


def test_bench_epoch_compiles_the_engine_and_the_bare_loop_alike(capsys, monkeypatch):
    torch._dynamo.reset()
    calls = []
    monkeypatch.setattr(torch, "compile", functools.partial(_aot_eager, calls))
    code, out, err = cli(capsys, "bench", TINY, "--epoch", "--epochs", "1", "--compile",
                         "--compile-mode", "reduce-overhead", "--json", "--size", "64",
                         "--batch", "32", "--device", "cpu")
    assert code == 0, err
    assert calls == [{"mode": "reduce-overhead"}] * 2  # the engine's model and the bare one
    rep = json.loads(out)  # the engine trained and validated through the compiled model
    assert rep["compile"] == "reduce-overhead" and len(rep["engine_epochs_s"]) == 1
    code, _, err = cli(capsys, "bench", TINY, "--compile")
    assert code == 2 and err.strip() == (
        "error: --compile: only with --epoch (the step benchmark times eager models)")
    code, _, err = cli(capsys, "bench", TINY, "--compile-mode", "max-autotune")
    assert code == 2 and err.strip().startswith("error: --compile-mode max-autotune: only with")
    code, _, err = cli(capsys, "bench", TINY, "--epoch", "--compile-mode", "max-autotune")
    assert code == 2 and err.strip() == "error: --compile-mode 'max-autotune': needs --compile"
