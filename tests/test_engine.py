import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellseg_plugins.cli.main import main
from cellseg_plugins.engine.checkpoint import load_checkpoint
from cellseg_plugins.engine.data import (CropDataset, DataError, fetch_sstem, fold_split,
                                         load_data, load_folder, parse_class_map)
from cellseg_plugins.engine.metrics import confusion, scores
from cellseg_plugins.engine.synthetic import synthetic_image
from cellseg_plugins.engine.train import TrainConfig, Trainer, TrainingError

TINY = "unet(encoder='plain4')"
FAST = ["--crop", "64", "--batch-size", "32", "--device", "cpu"]


def cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_synthetic_data_is_deterministic_and_has_all_classes():
    a, b = synthetic_image(7), synthetic_image(7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], synthetic_image(8)[0])
    sources = load_data("synthetic")
    counts = sum(np.bincount(m.ravel(), minlength=5) for m in sources.masks)
    assert len(sources.images) == 20 and (counts > 0).all()


def test_folds_split_by_source_image():
    split = fold_split(20, 5, 0)
    assert split["test"] == [0, 1, 2, 3] and split["val"] == [4, 5, 6, 7]
    assert split["train"] == list(range(8, 20))
    for k in range(5):
        s = fold_split(20, 5, k)
        assert not set(s["test"]) & set(s["val"]) and not set(s["train"]) & set(s["test"] + s["val"])
    with pytest.raises(DataError, match="--fold 5: expected 0 … 4"):
        fold_split(20, 5, 5)


def test_sstem_protocol_192_64_64(tmp_path, sstem_root):
    fetch_sstem(tmp_path, str(sstem_root))
    os.environ["CELLSEG_DATA"] = str(tmp_path)
    try:
        sources = load_data("sstem", "sstem5")
    finally:
        del os.environ["CELLSEG_DATA"]
    split = fold_split(len(sources.images), 5, 0)
    sizes = [len(CropDataset(sources, split[s], 256, [0.5], [0.2])) for s in ("train", "val", "test")]
    assert sizes == [192, 64, 64]
    assert sources.class_names[0] == "membrane" and max(int(m.max()) for m in sources.masks) == 4


def test_fetch_refuses_a_corrupt_copy_and_leaves_nothing(tmp_path, sstem_root):
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(sstem_root, bad)
    (bad / "stack1" / "raw" / "05.tif").write_bytes(b"corrupt")
    root = tmp_path / "root"
    with pytest.raises(DataError, match="05.tif: SHA-256 mismatch"):
        fetch_sstem(root, str(bad))
    assert not root.exists()


def test_fetch_download_code_with_a_file_url(tmp_path, sstem_root):
    target = fetch_sstem(tmp_path, sstem_root.resolve().as_uri())
    assert (target / "stack1" / "raw" / "19.tif").is_file()


def make_folder(root: Path, n=3, size=40, values=(0, 128, 255)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        Image.fromarray(rng.choice(values, (size, size)).astype(np.uint8)).save(root / "masks" / f"c{i}.png")


def test_user_folder_with_class_map(tmp_path):
    make_folder(tmp_path)
    sources = load_folder(tmp_path, "0:background,128:nucleus,255:membrane")
    assert sources.class_names == ("background", "nucleus", "membrane")
    assert {int(v) for m in sources.masks for v in np.unique(m)} == {0, 1, 2}


def test_user_folder_tiff_stack(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "raw" / "s.tif", np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels" / "s.tif", np.ones((3, 32, 32), np.uint8), photometric="minisblack")
    sources = load_folder(tmp_path)
    assert len(sources.images) == 3 and sources.class_names == ("class0", "class1")


@pytest.mark.parametrize("breakage, fragment", [
    ("missing_mask", "c1.png: no mask with stem 'c1'"),
    ("size", "differs from mask size"),
    ("unreadable", "c2.png: unreadable image"),
    ("unmapped", "mask value 255 is not in the class map"),
])
def test_bad_user_data_gives_one_line_errors(tmp_path, breakage, fragment):
    make_folder(tmp_path)
    class_map = "0:bg,128:a,255:b"
    if breakage == "missing_mask":
        (tmp_path / "masks" / "c1.png").unlink()
    elif breakage == "size":
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "masks" / "c0.png")
    elif breakage == "unreadable":
        (tmp_path / "images" / "c2.png").write_bytes(b"not a png")
    else:
        class_map = "0:bg,128:a"
    with pytest.raises(DataError) as err:
        load_folder(tmp_path, class_map)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_class_map_syntax_error():
    with pytest.raises(DataError, match="expected VALUE:NAME"):
        parse_class_map("0:bg,x")


def test_iou_from_accumulated_confusion():
    pred = torch.tensor([[0, 0, 1, 1]])
    target = torch.tensor([[0, 1, 1, 1]])
    s = scores(confusion(pred, target, 2), ("a", "b"))
    assert s["iou"] == {"a": pytest.approx(0.5), "b": pytest.approx(2 / 3)}
    assert s["pixel_accuracy"] == pytest.approx(0.75)


def tiny_config(out, epochs=2, **kw):
    return TrainConfig(spec=TINY, epochs=epochs, crop=64, batch_size=32, device="cpu",
                       out=str(out), **kw)


def test_train_writes_run_files_and_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY + "+frem(B=4)", "--epochs", "2", "--out", out, *FAST)
    assert code == 0, err
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.json"):
        assert (out / name).is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["spec"] == "unet(encoder='plain4')+frem(B=4)" and "torch" in config["versions"]
    code, stdout, _ = cli(capsys, "eval", out / "best.pt", "--json")
    result = json.loads(stdout)
    assert code == 0 and 0 <= result["miou"] <= 1 and set(result["iou"]) == {
        "membrane", "mitochondria", "synapse", "extracellular", "intracellular"}
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


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    full = tmp_path / "full"
    Trainer(tiny_config(full, epochs=3)).run()
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "cellseg_plugins.cli.main", "train", TINY, "--epochs", "3",
            "--out", str(killed), *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert load_checkpoint(killed / "last.pt")["epoch"] < 3  # killed mid-way
    subprocess.run(args + ["--resume"], check=True, capture_output=True)
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


@pytest.mark.parametrize("argv, fragment", [
    (["train", "unet", "--optimizer", "lbfgs"], "--optimizer 'lbfgs': expected one of adam, sgd"),
    (["train", "unet", "--data", "/nonexistent"], "--data '/nonexistent': not 'synthetic', 'sstem'"),
    (["train", "unet+lfa(m=4)"], "m=4: the window size must be odd"),
    (["train", "unet", "--epochs", "0"], "--epochs 0: must be ≥ 1"),
    (["eval", "/nonexistent.pt"], "checkpoint '/nonexistent.pt' does not exist"),
    (["data", "fetch", "mnist"], "unknown data set 'mnist'"),
    (["train", "unet", "--classes", "sstem4"], "--classes 'sstem4' applies to --data sstem only"),
    (["train", "unet", "--class-map", "0:a,1:b"], "--class-map applies to image folders"),
])
def test_cli_bad_input(capsys, tmp_path, argv, fragment):
    code, _, err = cli(capsys, *argv, *(["--out", tmp_path / "o"] if argv[0] == "train" else []))
    assert code == 2 and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "x.pt"
    torch.save({"hello": 1}, bogus)
    code, _, err = cli(capsys, "eval", bogus)
    assert code == 2 and "is not a cellseg checkpoint" in err


def test_checkpoint_whose_weights_do_not_fit_its_spec(tmp_path, capsys):
    Trainer(tiny_config(tmp_path / "run", epochs=1)).run()
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    ckpt["spec"] = TINY + "+feedback_convlstm"  # e.g. saved before per-round BatchNorm moved
    torch.save(ckpt, tmp_path / "mismatch.pt")
    code, _, err = cli(capsys, "eval", tmp_path / "mismatch.pt")
    assert code == 2 and "checkpoint does not rebuild" in err and err.count("\n") == 1


def test_data_info(capsys):
    code, out, _ = cli(capsys, "data", "info", "synthetic")
    assert code == 0 and "20 images" in out and "intracellular" in out


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cellseg_plugins.cli.main", "train", TINY, "--epochs", "1", "--out", str(out),
         "--crop", "64", "--batch-size", "16", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and 0 <= ckpt["history"][0]["val_miou"] <= 1
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # rank 0 wrote once


def test_cv_grid_summary_and_resume(tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["cv", TINY, "--folds", "3", "--seeds", "2", "--epochs", "1", "--out", out, *FAST]
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == [f"fold{f}_seed{s}" for f in range(3) for s in range(2)]
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0] == "class,mean_iou,std_iou,runs" and summary[-1].startswith("mIoU,")
    assert "| mIoU |" in (out / "summary.md").read_text()
    stamp = (out / "fold0_seed0" / "last.pt").stat().st_mtime
    code, _, err = cli(capsys, *argv)  # everything finished: nothing is retrained
    assert code == 0 and (out / "fold0_seed0" / "last.pt").stat().st_mtime == stamp


@pytest.mark.slow
def test_cv_jobs_2_gives_the_summary_of_jobs_1(tmp_path, capsys):
    argv = ["cv", TINY, "--folds", "3", "--seeds", "1", "--epochs", "1", "--threads", "1", *FAST]
    code, _, err = cli(capsys, *argv, "--jobs", "1", "--out", tmp_path / "one")
    assert code == 0, err
    code, _, err = cli(capsys, *argv, "--jobs", "2", "--out", tmp_path / "two")
    assert code == 0, err
    assert (tmp_path / "one" / "summary.csv").read_text() == (
        tmp_path / "two" / "summary.csv").read_text()


@pytest.mark.slow
def test_cv_reports_a_failed_run_and_finishes_the_others(tmp_path, capsys):
    bad = tmp_path / "bad" / "fold1_seed0"
    bad.mkdir(parents=True)
    (bad / "last.pt").write_bytes(b"not a checkpoint")  # fold 1 cannot resume
    code, _, err = cli(capsys, "cv", TINY, "--folds", "3", "--seeds", "1", "--epochs", "1",
                       "--jobs", "2", "--out", tmp_path / "bad", *FAST)
    last = err.strip().splitlines()[-1]  # after the finished runs' lines
    assert code == 2 and last.startswith("error: 1 of 3 runs failed: fold 1 seed 0:")
    assert (tmp_path / "bad" / "fold0_seed0" / "test.json").is_file()
    assert (tmp_path / "bad" / "fold2_seed0" / "test.json").is_file()


@pytest.mark.parametrize("shape", [(10, 13), (33, 200), (300, 41)])
def test_tiled_prediction_any_size(shape):
    import cellseg_plugins as cs
    from cellseg_plugins.engine.predict import predict_image

    model = cs.create_model("fpn(encoder='resnet18')", classes=3)  # FPN needs sizes divisible by 32
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    labels = predict_image(model, image, [0.5], [0.2], tile=64, overlap=8)
    assert labels.shape == shape and labels.dtype == np.uint8 and labels.max() < 3


def test_tiles_blend_to_the_untiled_prediction():
    import cellseg_plugins as cs
    from cellseg_plugins.engine.predict import predict_image

    torch.manual_seed(0)
    model = cs.create_model("unet(encoder='plain4')", classes=3).eval()
    image = np.random.default_rng(1).random((96, 96)).astype(np.float32)
    whole = predict_image(model, image, [0.5], [0.2], tile=96, overlap=0)
    tiled = predict_image(model, image, [0.5], [0.2], tile=64, overlap=32)
    assert (whole == tiled).mean() > 0.9  # same model, different tiling: near-identical labels


@pytest.mark.parametrize("command", ["cv", "tune"])
def test_bad_data_leaves_nothing_behind(tmp_path, capsys, command):
    extra = ["--search", "frem.B=int:1:4"] if command == "tune" else []
    code, _, err = cli(capsys, command, TINY + "+frem(B=2)", *extra, "--data", tmp_path / "nope",
                       "--out", tmp_path / "out", *FAST)
    assert code == 2 and "not 'synthetic', 'sstem' or an existing folder" in err
    assert not (tmp_path / "out").exists()
