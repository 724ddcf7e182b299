"""Training: run files, eval and predict of a run, metrics, resume, NaN losses."""

import json
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import torch

from cellseg_plugins.engine.checkpoint import load_checkpoint
from cellseg_plugins.engine.metrics import confusion, scores
from cellseg_plugins.engine.train import Trainer, TrainingError, init_warning
from conftest import FAST, ROOT, TINY, cli, tiny_config


def test_iou_from_accumulated_confusion():
    pred = torch.tensor([[0, 0, 1, 1]])
    target = torch.tensor([[0, 1, 1, 1]])
    s = scores(confusion(pred, target, 2), ("a", "b"))
    assert s["iou"] == {"a": pytest.approx(0.5), "b": pytest.approx(2 / 3)}
    assert s["pixel_accuracy"] == pytest.approx(0.75)


def test_confusion_leaves_ignored_targets_out():
    """Targets outside [0, classes) (IGNORE as -1, or 255 in uint8 device masks) are not
    counted; the rest as a slow loop counts them."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (2, 9, 7), generator=g)
    target = torch.randint(0, 3, (2, 9, 7), generator=g)
    target[0, :4], target[1, :, :2] = -1, 255
    slow = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if 0 <= t < 3:
            slow[t, p] += 1
    assert torch.equal(confusion(pred, target, 3), slow)
    assert slow.sum() == 2 * 9 * 7 - 4 * 7 - 9 * 2



def test_confusion_needs_no_value_from_the_device():
    """The counts' size never depends on the data, so on CUDA the host never waits inside
    validation: the meta device, which has shapes but no values, can run it (bincount, which
    reads its input's maximum to size its output, cannot)."""
    pred = torch.empty(2, 9, 7, dtype=torch.int64, device="meta")
    target = torch.empty(2, 9, 7, dtype=torch.uint8, device="meta")
    counts = confusion(pred, target, 5)
    assert counts.device.type == "meta" and counts.shape == (5, 5)
    with pytest.raises(Exception):
        torch.bincount(pred.flatten(), minlength=25)

def test_a_training_epoch_reads_from_the_device_only_at_its_end(tmp_path):
    """On CUDA, reading a value (item, float, nonzero's size) makes Python wait for the GPU,
    so it cannot queue the next step while this one runs. A training epoch, round-1 and
    deep-supervision losses included, reads two values at its end (the NaN check, the mean
    loss) and none per step; Adam's step counters live on the host, so reading them waits
    for nothing."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    spec = "classic_unet(width=4,se=True)+bottleneck_supervision+feedback_convlstm"  # 2 aux
    trainer = Trainer(tiny_config(tmp_path / "run", spec=spec))
    for p in trainer.model.parameters():  # Adam's state, by a step that changes nothing
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    counters = {id(s["step"]) for s in trainer.optimizer.state.values()}
    waits = Counter()

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in ("_local_scalar_dense", "nonzero", "masked_select", "bincount",
                        "unique", "_unique2") and id(args[0]) not in counters:
                waits[name] += 1
            return func(*args, **(kwargs or {}))

    steps = []
    with Reads():
        trainer.train_epoch(on_step=lambda i, n, loss: steps.append(i))
    assert len(steps) >= 5 and waits == {"nonzero": 1, "_local_scalar_dense": 1}


def test_train_writes_run_files_and_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY + "+frem(B=4)", "--epochs", "2", "--out", out, *FAST)
    assert code == 0, err
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.json"):
        assert (out / name).is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["spec"] == "unet(encoder='plain4')+frem(B=4)" and "torch" in config["versions"]
    assert config["channels_last"] is None and config["resolved"] == {  # what None became
        "device": "cpu", "precision": "fp32", "channels_last": True, "data_on_device": True,
        "threads": torch.get_num_threads()}
    code, stdout, _ = cli(capsys, "eval", out / "best.pt", "--json")
    result = json.loads(stdout)
    assert code == 0 and 0 <= result["miou"] <= 1 and set(result["iou"]) == {
        "membrane", "mitochondria", "synapse", "extracellular", "intracellular"}
    code, stdout, _ = cli(capsys, "eval", out / "best.pt", "--json", "--no-data-on-device")
    assert code == 0 and json.loads(stdout) == result  # the loader path counts the same
    code, stdout, _ = cli(capsys, "eval", out / "best.pt", "--json", "--split", "val")
    best = max(load_checkpoint(out / "last.pt")["history"], key=lambda row: row["val_miou"])
    assert code == 0 and json.loads(stdout)["miou"] == pytest.approx(best["val_miou"], abs=1e-6)
    image = tmp_path / "big.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((300, 200)) * 255).astype(np.uint8))
    code, _, err = cli(capsys, "predict", out / "best.pt", image, "--out", tmp_path / "pred",
                       "--tile", "128", "--overlay")
    assert code == 0, err
    labels = tifffile.imread(tmp_path / "pred" / "big.tif")
    assert labels.shape == (300, 200) and labels.max() < 5
    assert (tmp_path / "pred" / "big_overlay.png").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    Trainer(tiny_config(tmp_path / "full", epochs=2)).run()
    Trainer(tiny_config(tmp_path / "cut", epochs=1)).run()
    Trainer(tiny_config(tmp_path / "cut", epochs=2), resume=True).run()
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"][-1]["val_miou"] == b["history"][-1]["val_miou"]


def test_resume_takes_the_runs_options_and_refuses_other_ones(tmp_path, capsys):
    from cellseg_plugins.errors import ConfigError

    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, "--epochs", "1", "--lr", "0.01", "--loss",
                       "dice+ce", "--fold", "2", "--out", out, *FAST)
    assert code == 0, err
    # only --resume, --epochs and the device: the rest comes from the run, not the defaults
    code, _, err = cli(capsys, "train", TINY, "--out", out, "--resume", "--epochs", "2",
                       "--device", "cpu")
    assert code == 0, err
    ckpt = load_checkpoint(out / "last.pt")
    config = json.loads((out / "config.json").read_text())
    for c in (ckpt["config"], config):
        assert (c["lr"], c["loss"], c["fold"], c["crop"], c["batch_size"], c["epochs"]) == (
            0.01, "dice+ce", 2, 64, 32, 2)
    assert ckpt["epoch"] == 2 and ckpt["split"]["test"] == [8, 9, 10, 11]  # fold 2's block
    before = (out / "last.pt").stat().st_mtime, (out / "config.json").read_text()
    code, _, err = cli(capsys, "train", TINY, "--out", out, "--resume", "--epochs", "3",
                       "--lr", "0.1", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert (f"--lr 0.1: the run in '{out}' was trained with 0.01; leave the option out to "
            "continue it, or use another --out") in err
    assert ((out / "last.pt").stat().st_mtime, (out / "config.json").read_text()) == before
    with pytest.raises(ConfigError, match="batch_size=8: .* with 32; continue it with that"):
        Trainer(replace(tiny_config(out, epochs=3, lr=0.01, loss="dice+ce", fold=2),
                        batch_size=8), resume=True)
    best = (out / "best.pt").stat().st_mtime
    code, _, err = cli(capsys, "train", TINY, "--out", out, "--resume", "--device", "cpu")
    assert code == 0 and "nothing to train: the run in" in err and "finished 2 of 2" in \
        " ".join(err.split()), err  # not 'wrote best.pt'
    assert "wrote" not in err and (out / "best.pt").stat().st_mtime == best


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path, capsys):
    full = tmp_path / "full"
    Trainer(tiny_config(full, epochs=3)).run()
    killed = tmp_path / "killed"
    args = ["train", TINY, "--epochs", "3", "--out", killed, *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "cellseg_plugins.cli.main", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert load_checkpoint(killed / "last.pt")["epoch"] < 3  # killed mid-way
    code, _, err = cli(capsys, *args, "--resume")  # resumed by `cellseg train` in this process
    assert code == 0, err
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(killed / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=3))
    trainer.cfg.epochs = 1
    trainer.run()
    trainer.cfg.epochs = 3
    trainer.criterion = lambda logits, y: logits.sum() * float("nan")
    with pytest.raises(TrainingError, match="loss became nan at epoch 2"):
        trainer.run()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_checkpoint_every_holds_the_best_epoch_in_memory_until_a_write(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=3, checkpoint_every=3600))
    mious = iter([0.5, 0.7, 0.6])  # the best epoch is the second
    scores = {"pixel_accuracy": 0.9, "iou": {}}
    trainer.validate = lambda: {**scores, "miou": next(mious)}
    seen, weights = [], {}

    def on_epoch(row):
        seen.append((tmp_path / "last.pt").exists() or (tmp_path / "best.pt").exists())
        weights[row["epoch"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer.run(on_epoch=on_epoch)
    assert seen == [False, False, True]  # nothing written before the last epoch
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == 2 and last["epoch"] == 3 and best["best_miou"] == 0.7
    assert all(torch.equal(best["model"][k], weights[2][k]) for k in weights[2])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in weights[3])
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4  # every epoch


def test_bf16_on_a_cpu_without_its_units_is_named_and_fp32_suggested(tmp_path, capsys,
                                                                     monkeypatch):
    from cellseg_plugins.engine.train import emulation_note, missing_cpu_units

    cpu = torch.device("cpu")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported",
                  "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    assert missing_cpu_units(cpu, "bf16") == "AVX-512 BF16 or AMX"
    assert missing_cpu_units(cpu, "fp16") == "AMX-FP16"
    assert missing_cpu_units(cpu, "fp32") is None
    assert missing_cpu_units(torch.device("cuda"), "bf16") is None
    code, _, err = cli(capsys, "train", TINY, "--epochs", "1", "--precision", "bf16",
                       "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    assert ("note: this CPU has no AVX-512 BF16 or AMX, so bf16 autocast is emulated: "
            "--precision fp32 is faster here") in " ".join(err.split())
    assert emulation_note("cpu", "auto") is None  # fp32 on a CPU
    assert emulation_note("auto" if not torch.cuda.is_available() else "cpu", "fp16", "x") == (
        "note: this CPU has no AMX-FP16, so fp16 autocast is emulated: x")
    import cellseg_plugins.engine.cv as cv
    import cellseg_plugins.engine.study as study

    def stop(*args, on_start=None, **kw):
        if on_start:
            on_start([], 1)
        raise TrainingError("stopped before training")

    monkeypatch.setattr(cv, "run_cv", stop)
    monkeypatch.setattr(study, "run_study", stop)
    code, _, err = cli(capsys, "cv", TINY, "--precision", "bf16", "--out", tmp_path / "cv")
    assert code == 2 and "bf16 autocast is emulated: --precision fp32 is faster" in " ".join(
        err.split())
    code, _, err = cli(capsys, "study", "run", ROOT / "studies" / "sstem5.toml", "--scale", "cpu",
                       "--out", tmp_path / "study")
    assert code == 2 and "bf16 autocast is emulated: the study's runs are slower here" in " ".join(
        err.split())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # an AMX CPU
    assert missing_cpu_units(cpu, "bf16") is None
    assert emulation_note("cpu", "bf16") is None


def test_the_data_path_follows_data_on_device_then_workers(tmp_path, capsys):
    """Held on the device by default (on a CPU the splits are in memory already); --workers
    asks for the loader; --data-on-device with workers is refused in one line."""
    on = {(flag, workers): Trainer(tiny_config(tmp_path, data_on_device=flag,
                                               workers=workers)).on_device
          for flag, workers in ((None, 2), (False, 0))}  # (None, 0): True, in the test above
    assert on == {(None, 2): False, (False, 0): False}
    code, _, err = cli(capsys, "train", TINY, "--workers", "2", "--data-on-device",
                       "--out", tmp_path / "run", *FAST)
    assert code == 2 and err.count("\n") == 1 and err.startswith(
        "error: --workers 2: loader workers with --data-on-device")
    assert not (tmp_path / "run").exists()


def test_init_fine_tunes_from_a_checkpoints_matching_tensors(tmp_path, capsys):
    import cellseg_plugins as cs

    source = tmp_path / "source"
    Trainer(tiny_config(source, epochs=1)).run()
    trained = load_checkpoint(source / "best.pt")["model"]
    # the same model: every tensor comes from the checkpoint, none is fresh
    same = Trainer(tiny_config(tmp_path / "same", epochs=1, init=str(source / "best.pt")))
    assert same.fresh == [] and same.init_saw == [] and init_warning(same) is None
    # fold 1's test images were fold 0's training or validation images: said, not refused
    other_fold = Trainer(tiny_config(tmp_path / "fold1", epochs=1, fold=1,
                                     init=str(source / "best.pt")))
    assert other_fold.init_saw == other_fold.split["test"] == [4, 5, 6, 7]
    assert init_warning(other_fold) == (
        f"warning: --init {source / 'best.pt'} learnt from 4 of this run's 4 test images (the "
        "same data, another fold): its test scores are not held out")
    from cellseg_plugins.engine.cv import progress_lines

    capsys.readouterr()
    progress_lines("fold 1", other_fold)  # cv's runs say it too
    assert f"fold 1: {init_warning(other_fold)}\n" in capsys.readouterr().err
    for key, value in same.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    # a plugin more: its tensors start fresh, the network's come from the checkpoint
    more = Trainer(tiny_config(tmp_path / "more", epochs=1, spec=TINY + "+scse",
                               init=str(source / "best.pt")))
    assert more.fresh and all(k.startswith("scse_") for k in more.fresh)
    own = more.model.state_dict()
    assert set(own) - set(more.fresh) == set(trained)
    assert all(torch.equal(own[k], trained[k]) for k in trained)
    # from the command line: a line says what came from where; the run records it
    out = tmp_path / "tuned"
    code, _, err = cli(capsys, "train", TINY, "--init", source / "best.pt", "--epochs", "1",
                       "--out", out, *FAST)
    n = len(trained)
    assert code == 0 and f"fine-tuning from {source / 'best.pt'}: {n} of {n} tensors" in err
    assert "warning" not in err  # fold 0 again: its test images stayed held out
    assert json.loads((out / "config.json").read_text())["init"] == str(source / "best.pt")
    code, _, err = cli(capsys, "train", TINY, "--out", out, "--resume", "--epochs", "2",
                       "--device", "cpu")
    assert code == 0 and "fine-tuning" not in err, err  # resumed from last.pt, not --init
    model = cs.load_model(source / "best.pt")
    assert not model.training and model.cellseg_class_names == [
        "membrane", "mitochondria", "synapse", "extracellular", "intracellular"]
    assert set(model.cellseg_norm) == {"mean", "std"}
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_init_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    other = tmp_path / "other"
    Trainer(tiny_config(other, epochs=1, spec="classic_unet(width=2,depth=1)")).run()
    for init, message in (("", "--init '': expected a checkpoint, a state dict"),
                          (tmp_path / "none.pt", "--init: checkpoint '{}' does not exist"),
                          (other / "curves.png", "--init: checkpoint '{}' is unreadable"),
                          (other / "best.pt", "--init '{}': only 5 of this model's 110 "
                                              "tensors are in it (it holds 'classic_unet(width=2,"
                                              "depth=1)')")):
        code, _, err = cli(capsys, "train", TINY, "--init", init, "--out", tmp_path / "run",
                           *FAST)
        assert code != 0 and err.count("\n") == 1 and message.format(init) in err, err
        assert not (tmp_path / "run").exists()
