"""Test-time augmentation (engine/tta.py): the transforms, their average, and where it is used."""

import json

import numpy as np
import pytest
import tifffile
import torch

from cellseg_plugins.engine.predict import labels_info, load_predictor, predict_array
from cellseg_plugins.engine.tta import (TRANSFORMS, averaged_probabilities, transform,
                                        untransform, with_tta)
from conftest import ROOT, cli, checkpoint, tiny_config


def conv_model():
    """A small model with no symmetry: asymmetric 3×3 kernels, 3 classes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 3, 5, padding=2)).eval()


def reference(model, x: torch.Tensor, kind: str) -> np.ndarray:
    """The average by hand, in NumPy: each sample turned/flipped, predicted, put back."""
    out = 0
    for turns, flip in TRANSFORMS[kind]:
        a = x.numpy()
        a = np.rot90(a[..., ::-1] if flip else a, turns, axes=(-2, -1))
        with torch.no_grad():
            p = model(torch.from_numpy(a.copy())).softmax(1).numpy()
        p = np.rot90(p, -turns, axes=(-2, -1))
        out = out + (p[..., ::-1] if flip else p)
    return out / len(TRANSFORMS[kind])


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_each_transform_is_undone_and_the_average_is_the_reference(kind):
    x = torch.rand(2, 2, 12, 12)
    wide = torch.rand(1, 2, 6, 10)
    for turns, flip in TRANSFORMS[kind]:
        assert torch.equal(untransform(transform(x, turns, flip), turns, flip), x)
        assert torch.equal(untransform(transform(wide, turns, flip), turns, flip), wide)
    assert len(set(TRANSFORMS[kind])) == {"none": 1, "flips": 4, "d4": 8}[kind]
    model = conv_model()
    with torch.no_grad():
        got = averaged_probabilities(model, x, kind)
    np.testing.assert_allclose(got.numpy(), reference(model, x, kind), rtol=1e-5, atol=1e-6)


def test_the_average_follows_the_image_it_averages_over():
    """Equivariance: predicting a flipped (d4: or turned) image gives the flipped (turned)
    probabilities; a plain model does not (so the check can fail)."""
    model, x = conv_model(), torch.rand(1, 2, 16, 16)
    with torch.no_grad():
        for kind, moves in (("flips", [(0, True), (2, True), (2, False)]),
                            ("d4", TRANSFORMS["d4"])):
            p = averaged_probabilities(model, x, kind)
            for turns, flip in moves:
                torch.testing.assert_close(
                    averaged_probabilities(model, transform(x, turns, flip), kind),
                    transform(p, turns, flip), rtol=1e-5, atol=1e-6)
        plain = model(x).softmax(1)
        assert not torch.allclose(model(transform(x, 1, False)).softmax(1),
                                  transform(plain, 1, False), atol=1e-3)
        assert with_tta(model, "none") is model
        assert torch.allclose(with_tta(model, "d4")(x).softmax(1),
                              averaged_probabilities(model, x, "d4"), atol=1e-6)


def test_predict_with_tta_through_tiles_files_and_resume(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, "classic_unet(width=4)")
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    predictor = load_predictor(ckpt)
    labels = predict_array(predictor, image, tile=64, overlap=0, tta="d4")
    turned = predict_array(predictor, np.rot90(image).copy(), tile=64, overlap=0, tta="d4")
    assert (turned == np.rot90(labels)).mean() > 0.999  # ties aside, the same labels turned
    plain = predict_array(predictor, image, tile=64, overlap=0)
    assert (plain != labels).any()  # it did something
    tifffile.imwrite(tmp_path / "a.tif", image)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "a.tif", "--out", out, "--tile",
                       "64", "--overlap", "0", "--tta", "d4", "--device", "cpu")
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(out / "a.tif"), labels)
    assert labels_info(out / "a.tif")["made_by"]["tta"] == "d4"
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "a.tif", "--out", out, "--tile",
                       "64", "--overlap", "0", "--tta", "d4", "--resume", "--device", "cpu")
    assert code == 0 and "kept" in err, err
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "a.tif", "--out", out, "--tile",
                       "64", "--overlap", "0", "--resume", "--device", "cpu")
    assert code == 0 and "kept" not in err, err  # made without TTA: predicted again
    np.testing.assert_array_equal(tifffile.imread(out / "a.tif"), plain)
    assert "tta" not in labels_info(out / "a.tif")["made_by"]
    code, _, err = cli(capsys, "predict", ckpt, tmp_path / "a.tif", "--out", tmp_path / "bad",
                       "--tta", "rot")
    assert code == 2 and err.count("\n") == 1 and "--tta 'rot': expected none, flips, d4" in err
    assert not (tmp_path / "bad").exists()


def test_eval_with_tta(tmp_path, capsys):
    from cellseg_plugins.engine.evaluation import evaluate_checkpoint
    from cellseg_plugins.engine.train import Trainer

    Trainer(tiny_config(tmp_path / "run", epochs=1)).run()
    best = tmp_path / "run" / "best.pt"
    plain, d4 = (evaluate_checkpoint(best, device="cpu", tta=kind) for kind in ("none", "d4"))
    assert 0 <= d4["miou"] <= 1 and d4["pixel_accuracy"] != plain["pixel_accuracy"]
    code, out, err = cli(capsys, "eval", best, "--tta", "flips", "--device", "cpu")
    assert code == 0 and "test-time augmentation flips" in " ".join(out.split()), err
    code, _, err = cli(capsys, "eval", best, "--tta", "8")
    assert code == 2 and err.count("\n") == 1 and "--tta '8': expected none, flips, d4" in err


@pytest.mark.parametrize("name", sorted(p.parent.name
                                         for p in (ROOT / "results").glob("tta-*/tta.jsonl")))
def test_the_published_tta_tables_rebuild_from_their_stored_evaluations(name):
    """results/tta-*/table.md is what results/tta_table.py makes of its tta.jsonl."""
    import importlib.util

    folder = ROOT / "results" / name
    spec = importlib.util.spec_from_file_location("tta_table", ROOT / "results" / "tta_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = (folder / "tta.jsonl").read_text().splitlines()
    assert module.table(lines) == (folder / "table.md").read_text()
    for line in lines:  # each evaluation without TTA is the run's own test.json
        d = json.loads(line)
        if d["tta"] == "none":
            test = json.loads((folder / d["run"] / "test.json").read_text())
            assert {k: test[k] for k in d["result"]} == d["result"]
