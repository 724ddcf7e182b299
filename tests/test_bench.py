import json
import time

import pytest

from cellseg_plugins.cli.main import main


def test_bench_json_with_ratio(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "unet(encoder='plain4')+frem(B=4)", "--vs", "unet(encoder='plain4')",
              "--size", "32", "--batch", "2", "--steps", "2", "--device", "cpu", "--threads", "1",
              "--json"])
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == "unet(encoder='plain4')+frem(B=4)"
    assert report["vs"]["spec"] == "unet(encoder='plain4')"
    assert set(report["ratio"]) >= {"train_time", "eval_time", "peak_memory"}
    assert report["train_time"]["n"] == 2 and report["peak_memory"] > 0
    assert report["params"] == report["vs"]["params"]  # FREM adds no parameters
    assert report["train_flops"] > 2 * report["eval_flops"] > 0  # backward costs about 2 forwards
    assert report["ratio"]["train_flops"] == 1.0  # FREM multiplies; it adds no conv or matmul
    assert report["precision"] == "fp32" and report["channels_last"]  # train's defaults on CPU
    assert report["torch_threads"] == report["vs"]["torch_threads"] == 1  # each worker's


def test_bench_steps_run_under_the_precision_asked_for(monkeypatch):
    """--precision bf16 puts the step benchmark's forwards under bf16 autocast (the loss in
    fp32, as the engine computes it); fp32 runs without autocast; the layout is the one asked
    for."""
    import torch

    from cellseg_plugins.engine import bench

    seen = []
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda logits, *a, **kw: (
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype)), real(logits, *a, **kw))[1])
    conv = torch.nn.Conv2d
    def forward(self, x):
        y = conv._conv_forward(self, x, self.weight, self.bias)
        seen.append(("conv", (y.dtype, y.shape[1] == 1 or not y.is_contiguous())))
        return y

    monkeypatch.setattr(torch.nn.Conv2d, "forward", forward)
    for precision, dtype, layout in (("bf16", torch.bfloat16, True), ("fp32", torch.float32,
                                                                       False)):
        seen.clear()
        cfg = bench.BenchConfig(size=32, batch=2, classes=3, steps=1, precision=precision,
                                channels_last=layout)
        monkeypatch.setattr("sys.stdin", iter(["train\n", "eval\n", "done\n"]))
        monkeypatch.setattr(bench, "_reply", lambda obj: None)
        bench.worker("unet(encoder='plain4')", cfg)
        convs = {d for tag, d in seen if tag == "conv"}
        assert convs == {(dtype, layout)}  # every convolution: this precision and layout
        assert {d for tag, d in seen if tag != "conv"} == {torch.float32}  # the loss


def test_count_flops_of_a_convolution_is_two_per_multiply_add():
    import torch

    from cellseg_plugins.engine.bench import count_flops

    conv, x = torch.nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 8, 8)
    assert count_flops(lambda: conv(x)) == 2 * (2 * 8 * 8) * 5 * (3 * 3 * 3)


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "unet", "--steps", "0"], "--steps 0: must be at least 1"),
    (["bench", "unet", "--threads", "0"], "--threads 0: must be at least 1"),
    (["bench", "unet", "--device", "tpu"], "--device 'tpu': expected auto, cpu or cuda"),
    (["bench", "unet(encoder='plain8')+frem(B=999)"], "B=999 is larger than the bottleneck's 128"),
    (["bench", "unet", "--precision", "tf32"], "--precision 'tf32': expected auto, fp32, bf16"),
    (["bench", "unet", "--data", "sstem"], "error: --data sstem: only with --epoch"),
    (["bench", "unet", "--epochs", "5"], "error: --epochs 5: only with --epoch"),
    (["bench", "unet", "--no-data-on-device"],
     "error: --data-on-device/--no-data-on-device: only with --epoch"),
    (["bench", "unet", "--epoch", "--vs", "fpn"], "error: --vs fpn: only without --epoch"),
    (["bench", "unet", "--epoch", "--classes", "3"], "error: --classes 3: only without --epoch"),
    (["bench", "unet", "--class-map", "0:a,1:b"], "error: --class-map 0:a,1:b: only with --epoch"),
])
def test_bench_bad_input(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and err.count("\n") == 1


def test_count_flops_of_attention_on_cpu():
    import torch

    from cellseg_plugins.engine.bench import count_flops
    from cellseg_plugins.full_attention import fused_attention

    q, k, v = torch.randn(2, 30, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    assert count_flops(lambda: fused_attention(q, k, v)) == 2 * (2 * 2 * 30 * 20 * 8)  # qkᵀ, ·v
    q.requires_grad_()
    assert count_flops(lambda: fused_attention(q, k, v).sum().backward()) > 2 * (2 * 2 * 30 * 20 * 8)


def test_epoch_bench_times_each_engine_epoch_of_one_run_against_a_bare_epoch():
    from dataclasses import replace

    from cellseg_plugins.engine.epoch_bench import run_epoch_bench
    from cellseg_plugins.engine.train import Trainer
    from conftest import tiny_config

    runs, saves = [], []
    run, save = Trainer.run, Trainer.save
    Trainer.run = lambda self, *a, **k: runs.append(1) or run(self, *a, **k)
    Trainer.save = lambda self, improved: saves.append(self.epoch) or save(self, improved)
    try:
        rep = run_epoch_bench(replace(tiny_config("unused"), batch_size=8), epochs=2)
    finally:
        Trainer.run, Trainer.save = run, save
    assert runs == [1] and saves == [1, 2, 3]  # one run, as cellseg train: files every epoch
    assert len(rep["engine_epochs_s"]) == len(rep["bare_epochs_s"]) == 2
    assert 0 < rep["engine_files_s"] < rep["engine_epoch_s"]
    assert rep["ratio"] == rep["engine_epoch_s"] / rep["bare_epoch_s"]


def test_a_slow_bare_loop_does_not_make_the_engine_write_more_files(monkeypatch):
    """The engine redraws curves.png and writes checkpoints by its own elapsed time; a bare
    epoch between two engine epochs must not count (an H200 run whose bare loop took 18 s an
    epoch had the engine redraw its curves nearly every epoch). The engine's clock is made to
    jump an hour in each bare epoch: only the first and the last epoch's curves are drawn."""
    import types
    from dataclasses import replace

    import cellseg_plugins.engine.train as train
    from cellseg_plugins.engine import epoch_bench
    from conftest import tiny_config

    jump = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + jump[0],
                                  perf_counter=time.perf_counter)
    monkeypatch.setattr(train, "time", clock)

    def slow_bare_epoch(*args, **kwargs):
        jump[0] += 3600.0

    monkeypatch.setattr(epoch_bench, "bare_epoch", slow_bare_epoch)
    plots, saves = [], []
    real_plot, real_save = train.plot_curves, train.save_atomic
    monkeypatch.setattr(train, "plot_curves", lambda h, p: plots.append(len(h)) or real_plot(h, p))
    monkeypatch.setattr(train, "save_atomic", lambda c, p: saves.append(p.name) or real_save(c, p))
    cfg = replace(tiny_config("unused"), batch_size=8, checkpoint_every=600.0)
    epoch_bench.run_epoch_bench(cfg, epochs=3)
    assert plots == [1, 4] and saves.count("last.pt") == 1  # at the end only
    assert jump[0] == 4 * 3600.0  # the bare loop ran, and the clock did jump


def test_bare_epoch_feeds_the_model_in_the_memory_format_asked_for():
    import torch

    from cellseg_plugins.engine.epoch_bench import bare_epoch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 1))
    seen = []
    model[0].register_forward_pre_hook(
        lambda m, args: seen.append((m.training, args[0].is_contiguous(
            memory_format=torch.channels_last))))
    data = (torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4, 8, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for channels_last in (False, True):
        seen.clear()
        bare_epoch(model, opt, data, data, 2, torch.device("cpu"), channels_last=channels_last)
        assert seen == [(True, channels_last)] * 2 + [(False, channels_last)] * 2


def test_bare_epoch_marks_each_cuda_graph_step_as_the_engine_does(monkeypatch):
    """torch's docs ask a reduce-overhead training loop to begin each step with
    cudagraph_mark_step_begin(); an H200 timed the bare loop without it at 18 s an epoch
    (the engine, which marks, 0.15-0.36 s). It now marks every training step, not the
    validation ones, and only when asked."""
    import torch

    from cellseg_plugins.engine.epoch_bench import bare_epoch

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = torch.nn.Conv2d(3, 2, 1)
    data = (torch.randn(6, 3, 8, 8), torch.randint(0, 2, (6, 8, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bare_epoch(model, opt, data, data, 2, torch.device("cpu"))
    assert marks == []
    bare_epoch(model, opt, data, data, 2, torch.device("cpu"), cudagraphs=True)
    assert len(marks) == 3  # 6 crops in batches of 2


def test_epoch_bench_on_a_folder_with_a_class_map(tmp_path, capsys):
    """A folder of grey-level masks needs --class-map, as in train; sides the crop does not
    divide get their edge crops in the engine and the bare loop alike."""
    import json

    import numpy as np
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(
            tmp_path / "images" / f"c{i}.png")
        Image.fromarray(rng.choice([0, 255], (48, 40)).astype(np.uint8)).save(
            tmp_path / "masks" / f"c{i}.png")
    main_args = ["bench", "unet(encoder='plain4')", "--epoch", "--data", str(tmp_path),
                 "--class-map", "0:bg,255:cell", "--size", "32", "--batch", "2", "--epochs", "1",
                 "--json"]
    with pytest.raises(SystemExit) as exit_info:
        main(main_args)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    rep = json.loads(out)
    assert rep["train_crops"] == 3 * 4 and rep["val_crops"] == 4  # 2 × 2 crops an image
