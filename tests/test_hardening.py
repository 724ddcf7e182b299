"""Bad sizes and options in one line; faults mid-write leave the last good files."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cellseg_plugins as cs
from cellseg_plugins.engine.checkpoint import LOCK_NAME, TMP_SUFFIX, hold_folder, load_checkpoint
from cellseg_plugins.engine.train import Trainer, TrainingError
from cellseg_plugins.input_rules import input_rules
from conftest import FAST, checkpoint, cli, small_spec, tiny_config

TINY = "classic_unet(width=4)"


# ---------------------------------------------------------------- input sizes


@pytest.mark.parametrize("arch", [a for a in cs.list_archs()])
def test_list_states_each_archs_input_rule(arch):
    """The rule `cellseg list` shows is the one found by running the model."""
    model = cs.create_model(small_spec(arch), classes=3)
    rules = input_rules(model)
    text = cs.registry.get_entry(arch).to_json()["input"]
    if rules.fixed is not None:
        assert text.startswith("exactly") and rules.fixed == 64
    elif rules.multiple == 1:
        assert text == "any size"
    else:
        expected = f"multiples of {rules.multiple}"
        if rules.minimum > rules.multiple:
            expected += f", at least {rules.minimum}"
        assert text.replace("2^depth (16)", "16") == expected


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "fpn(encoder='resnet18')", "--size", "100"],
     "--size 100: this model takes sides multiples of 32, at least 32 (e.g. 128)"),
    (["bench", "pan(encoder='resnet18')", "--size", "64"],
     "--size 64: this model takes sides multiples of 16, at least 128 (e.g. 128)"),
    (["train", "fpn(encoder='resnet18')", "--crop", "100", "--device", "cpu"],
     "--crop 100: this model takes sides multiples of 32"),
    # values smp builds but cannot run: the model's fault, not the size's (it said 'at least 512')
    (["train", "fpn(encoder='resnet18',decoder_pyramid_channels=0)", "--crop", "64"],
     "error: fpn(encoder='resnet18',decoder_pyramid_channels=0) runs on no input size from "
     "32² to 512² (RuntimeError: Given groups=1, expected weight to be at least 1"),
    (["bench", "unet(encoder='resnet18',decoder_interpolation='zzz')", "--size", "64"],
     "runs on no input size from 1² to 512² (NotImplementedError: Input Error: Only 3D, 4D "
     "and 5D input Tensors supported (got 4D) for the modes: nearest | linear"),
    # outputs of another size than the input (a traceback from the loss before)
    (["train", "fpn(encoder='resnet18',upsampling=2)", "--crop", "64"],
     "error: fpn(encoder='resnet18',upsampling=2): a 32×32 input gives 16×16 outputs; the "
     "output must have the input's size (upsampling=4 gives it)"),
    (["bench", "pspnet(encoder='resnet18',encoder_depth=4,upsampling=8)", "--size", "64"],
     "a 16×16 input gives 8×8 outputs; the output must have the input's size (upsampling=16 "
     "gives it)"),
])
def test_sizes_a_model_refuses_are_one_line_before_any_work(capsys, tmp_path, argv, fragment):
    code, _, err = cli(capsys, *argv, "--out" if argv[0] == "train" else "--steps",
                       tmp_path / "run" if argv[0] == "train" else 1)
    assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", ["fpn(encoder='resnet18',encoder_depth=3)",
                                  "fpn(encoder='resnet18',encoder_depth=4)",
                                  "fpn(encoder='resnet18')",
                                  "pspnet(encoder='resnet18',encoder_depth=1)",
                                  "pspnet(encoder='resnet18',encoder_depth=4)",
                                  "pspnet(encoder='resnet18',encoder_depth=5)"])
def test_fpn_and_pspnet_upsample_to_the_inputs_size_at_any_encoder_depth(spec):
    """smp's fixed upsampling (FPN 4, PSPNet 8) fits only the default depth: FPN at depth 4
    gave outputs twice the input's size, PSPNet at depth 4 half of it."""
    model = cs.create_model(spec, classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    depth = 5 if spec == "fpn(encoder='resnet18')" else int(spec[-2])
    factor = 2 ** (depth - 3) if spec.startswith("fpn") else 2 ** depth
    upsample = [m for m in model.segmentation_head.modules() if isinstance(m, torch.nn.Upsample)]
    assert [u.scale_factor for u in upsample] == ([float(factor)] if factor > 1 else [])


def test_predict_pads_what_the_model_cannot_take(tmp_path, capsys):
    from cellseg_plugins.engine.predict import predict_image

    model = cs.create_model("pan(encoder='resnet18')", classes=3)
    image = np.random.default_rng(0).random((70, 50)).astype(np.float32)
    labels = predict_image(model, image, [0.5], [0.2], tile=64, rules=input_rules(model))
    assert labels.shape == (70, 50)


def test_predict_names_a_file_format_it_does_not_read(tmp_path, capsys):
    """A microscope format no reader of ours knows (Zeiss CZI) is named in one line, and a
    broken MRC file is one line saying why, before anything is written; a PNG saved without
    its extension is still read by its content."""
    ckpt, _ = checkpoint(tmp_path, TINY)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.czi").write_bytes(b"ZISRAWFILE" + b"\0" * 100)
    (tmp_path / "in" / "tomo.mrc").write_bytes(b"\0" * 1024 + b"MAP ")
    image = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "section", format="PNG")
    for bad, message in [
        ("scan.czi", "cellseg does not read .czi files; it reads TIFF, MRC, PNG, JPEG, BMP"),
        ("tomo.mrc", "unreadable image (ValueError: Map ID string not found - not an MRC "
                     "file, or file is corrupt)"),
    ]:
        code, _, err = cli(capsys, "predict", ckpt, tmp_path / "in" / "section",
                           tmp_path / "in" / bad, "--out", tmp_path / "pred", "--tile", 32,
                           "--overlap", 8)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{tmp_path / 'in' / bad}: {message}" in err
        assert not (tmp_path / "pred").exists()
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "in" / "section", "--out",
                       tmp_path / "pred", "--tile", 32, "--overlap", 8)
    assert code == 0 and (tmp_path / "pred" / "section.tif").exists(), err


@pytest.mark.parametrize("layout, fragment", [
    ({"imagej": True}, "its ImageJ header describes a stack of 4 images, of which 1 can be "
                       "read (a truncated or corrupted file): save the stack again"),
    ({"imagej": True, "truncate": True}, "its ImageJ header describes a stack of 4 images, of "
                                         "which 1 can be read (a truncated or corrupted file)"),
    ({}, "the file ends before its pixels do ("),  # (N bytes, N + 5000 needed): a truncated file
])
def test_a_stack_cut_short_is_one_line_not_its_first_page(tmp_path, capsys, layout, fragment):
    """A TIFF stack whose last bytes are missing (a copy cut short): tifffile reads an ImageJ
    stack as its first page alone (predict labelled one section of four) and fails on the last
    page of others; now one line before anything is read or written, wherever it is read."""
    import tifffile

    from cellseg_plugins.engine.data import DataError
    from cellseg_plugins.engine.image_files import read_image

    ckpt, _ = checkpoint(tmp_path, TINY)
    path = tmp_path / "sections.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (4, 64, 64), np.uint8),
                     **layout)
    path.write_bytes(path.read_bytes()[:-5000])
    code, _, err = cli(capsys, "predict", ckpt, path, "--out", tmp_path / "pred", "--tile", 32,
                       "--overlap", 8)
    assert code == 2 and err == f"error: {path}: {fragment}" + err.split(fragment)[1], err
    assert err.count("\n") == 1 and not (tmp_path / "pred").exists()
    if not layout:
        size = path.stat().st_size
        assert f"({size} bytes, {size + 5000} needed): a truncated file" in err
    with pytest.raises(DataError, match="truncated"):
        read_image(path)


def test_predict_never_writes_over_an_input_or_one_output_twice(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, TINY)
    image = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    for sub in ("day1", "day2"):
        (tmp_path / sub).mkdir()
        Image.fromarray(image).save(tmp_path / sub / "a.tif")
    Image.fromarray(image).save(tmp_path / "day1" / "a_overlay.png")
    before = (tmp_path / "day1" / "a.tif").read_bytes()
    cases = [
        ((tmp_path / "day1", tmp_path / "day2"), tmp_path / "pred",
         f"{tmp_path / 'day1' / 'a.tif'} and {tmp_path / 'day2' / 'a.tif'} would both be "
         f"written to {tmp_path / 'pred' / 'a.tif'}; predict them into separate --out folders"),
        ((tmp_path / "day1" / "a.tif",), tmp_path / "day1",
         f"would overwrite the input {tmp_path / 'day1' / 'a.tif'}; choose another --out"),
        ((tmp_path / "day2" / "a.tif", tmp_path / "day1" / "a_overlay.png"), tmp_path / "day1",
         f"would overwrite the input {tmp_path / 'day1' / 'a_overlay.png'}"),  # --overlay's PNG
        ((tmp_path / "day1" / "a.tif",), tmp_path / "a.tif",
         f"--out '{tmp_path / 'a.tif'}': must be a folder (each label TIFF is named after"),
    ]
    for inputs, out, fragment in cases:
        code, _, err = cli(capsys, "predict", ckpt, *inputs, "--out", out, "--tile", 32,
                           "--overlap", 8, "--overlay")
        assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert (tmp_path / "day1" / "a.tif").read_bytes() == before
    assert not (tmp_path / "pred").exists() and not (tmp_path / "a.tif").exists()
    assert sorted(p.name for p in (tmp_path / "day1").iterdir()) == ["a.tif", "a_overlay.png"]
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "day1" / "a.tif", "--out",
                       tmp_path / "pred", "--tile", 32, "--overlap", 8, "--overlay")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a.tif", "a_overlay.png"]


# ---------------------------------------------------------------- eval mirrors training


def folder(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(
            tmp_path / "data" / "images" / f"{i}.png")
        mask = np.where(rng.random((64, 64)) > 0.5, 255, 0).astype(np.uint8)
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"{i}.png")
    return tmp_path / "data"


def test_eval_takes_the_training_data_options_and_checks_them(tmp_path, capsys):
    data = folder(tmp_path)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, "--data", data, "--class-map", "0:bg,255:cell",
                       "--folds", "3", "--epochs", "1", "--out", out, *FAST)
    assert code == 0, err
    code, stdout, err = cli(capsys, "eval", out / "best.pt", "--class-map", "0:bg, 255:cell",
                            "--json")
    assert code == 0 and set(json.loads(stdout)["iou"]) == {"bg", "cell"}
    code, _, err = cli(capsys, "eval", out / "best.pt", "--class-map", "0:cell,255:bg")
    assert code == 2 and err.count("\n") == 1
    assert "--class-map '0:cell,255:bg': the model was trained with --class-map '0:bg,255:cell'" in err
    code, _, err = cli(capsys, "eval", out / "best.pt", "--classes", "sstem4")
    assert code == 2 and "--classes 'sstem4': the model was trained with none" in err


# ---------------------------------------------------------------- faults mid-write


def tiny(out, epochs=2):
    return tiny_config(out, epochs, spec=TINY)


def test_a_full_disk_keeps_the_last_good_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    Trainer(tiny(out, epochs=1)).run()
    good = load_checkpoint(out / "last.pt")
    metrics = (out / "metrics.csv").read_text()

    def full(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError, match="No space left on device.*--resume"):
        Trainer(tiny(out, epochs=2), resume=True).run()
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["epoch"] == good["epoch"] == 1
    assert (out / "metrics.csv").read_text() == metrics
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK_NAME]
    Trainer(tiny(out, epochs=2), resume=True).run()  # space again: the run finishes
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_a_second_process_training_into_a_run_folder_is_refused(tmp_path, capsys):
    """Two commands training into one folder (a study started twice, `train --resume` while a
    cv trains that run) would write the same files; the second is refused in one line."""
    out = tmp_path / "run"
    Trainer(tiny(out, epochs=1)).run()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / f".last.pt.x{TMP_SUFFIX}").write_bytes(b"the other process's file being written")
    other = hold_folder(out)  # as another process would hold it while it trains there
    code, _, err = cli(capsys, "train", TINY, "--out", out, "--resume", "--epochs", 2, *FAST)
    assert code == 2 and err.count("\n") == 1, err
    assert f"'{out}' is in use by another cellseg process (pid {os.getpid()})" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if TMP_SUFFIX not in p.name} == before
    assert (out / f".last.pt.x{TMP_SUFFIX}").exists()  # its half-written file is left alone
    other.close()  # it ended (the OS releases the lock of a process that dies in any way)
    Trainer(tiny(out, epochs=2), resume=True).run()
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert not list(out.glob(f"*{TMP_SUFFIX}"))  # stale now: removed before training


def test_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")  # some NFS mounts

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert hold_folder(tmp_path / "run") is None
    Trainer(tiny(tmp_path / "run", epochs=1)).run()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_truncated_checkpoints_and_corrupt_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny(out, epochs=1)).run()
    (out / "metrics.csv").write_text("epoch,train_loss\n1,garbage\n\x00\x00")
    Trainer(tiny(out, epochs=2), resume=True).run()  # metrics rebuilt from the checkpoint
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_miou") and len(rows) == 3
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])
    code, _, err = cli(capsys, "train", TINY, "--epochs", "3", "--resume", "--out", out, *FAST)
    assert code == 2 and err.count("\n") == 1 and "last.pt' is unreadable" in err
    best = (out / "best.pt").read_bytes()
    (out / "best.pt").write_bytes(best[:100])
    code, _, err = cli(capsys, "eval", out / "best.pt")
    assert code == 2 and err.count("\n") == 1 and "best.pt' is unreadable" in err


@pytest.mark.slow
def test_sigkill_during_training_leaves_loadable_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"

    def argv(epochs, *extra):
        return [sys.executable, "-m", "cellseg_plugins.cli.main", "train", TINY, "--epochs",
                str(epochs), "--out", str(out), *FAST, *extra]

    def training(since: int) -> None:
        """Wait until the run has written last.pt after ``since`` (its mtime): it is in its
        epochs (one written every epoch on a CPU), not starting up."""
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "last.pt").exists() and (out / "last.pt").stat().st_mtime_ns > since:
                return
            time.sleep(0.05)
        raise AssertionError("the run wrote no checkpoint within 120 s")

    since = 0
    proc = subprocess.Popen(argv(40), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for k, delay in enumerate((0.13, 0.5)):  # kill a new and a resumed run mid-training
        if k:
            since = (out / "last.pt").stat().st_mtime_ns
            proc = subprocess.Popen(argv(40, "--resume"), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        training(since)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed while training, not finished
        assert load_checkpoint(out / "last.pt")["epoch"] >= 1  # whatever the moment
        assert load_checkpoint(out / "best.pt")["epoch"] >= 1
    epoch = load_checkpoint(out / "last.pt")["epoch"]
    code, _, err = cli(capsys, *argv(epoch + 1, "--resume")[3:])  # in this process
    assert code == 0, err
    assert load_checkpoint(out / "last.pt")["epoch"] == epoch + 1
    assert not [p for p in os.listdir(out) if p.endswith(".partial")]  # stale ones removed
