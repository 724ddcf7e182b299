"""Predicting with a cv folder's models together (engine/ensemble.py)."""

import numpy as np
import pytest
import tifffile
import torch

from cellseg_plugins.engine.ensemble import combined_rules
from cellseg_plugins.engine.predict import labels_info, load_predictor, predict_array
from cellseg_plugins.errors import DataError
from cellseg_plugins.input_rules import InputRules
from conftest import checkpoint, cli


def cv_folder(tmp_path, norms=((0.5, 0.2), (0.3, 0.1)), names=None):
    """A cv folder of runs fold<k>_seed0/best.pt, each its own weights and normalisation."""
    models = []
    for k, (mean, std) in enumerate(norms):
        run = tmp_path / "cv" / f"fold{k}_seed0"
        run.mkdir(parents=True)
        torch.manual_seed(k)
        path, model = checkpoint(run, "classic_unet(width=4)", name="best.pt")
        ckpt = torch.load(path, weights_only=True)
        torch.manual_seed(10 + k)  # members differ in their weights as well as their norms
        state = {n: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
                 for n, v in ckpt["model"].items()}
        model.load_state_dict(state)
        ckpt.update(model=state, norm={"mean": [mean], "std": [std]})
        if names and k:
            ckpt["class_names"] = names
        torch.save(ckpt, path)
        models.append((model.eval(), mean, std))
    return tmp_path / "cv", models


def test_a_cv_folder_predicts_with_its_runs_probabilities_averaged(tmp_path, capsys):
    folder, models = cv_folder(tmp_path)
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    unit = torch.from_numpy(image / 255.0).float()[None, None]
    with torch.no_grad():  # by hand: each member normalises with its own statistics
        probs = [m((unit - mean) / std).softmax(1) for m, mean, std in models]
    expected = ((probs[0] + probs[1]) / 2).argmax(1)[0].numpy()
    singles = [p.argmax(1)[0].numpy() for p in probs]
    labels = predict_array(load_predictor(folder), image, tile=64, overlap=0)
    np.testing.assert_array_equal(labels, expected)
    assert all((labels != single).any() for single in singles)  # neither member alone
    _, meta, _ = load_predictor(folder)
    assert meta["members"] == ["fold0_seed0/best.pt", "fold1_seed0/best.pt"]

    tifffile.imwrite(tmp_path / "a.tif", image)
    args = ["predict", folder, tmp_path / "a.tif", "--out", tmp_path / "out", "--tile", "64",
            "--overlap", "0", "--device", "cpu"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "a.tif"), expected)
    made_by = labels_info(tmp_path / "out" / "a.tif")["made_by"]
    code, _, err = cli(capsys, *args, "--resume")
    assert code == 0 and "kept" in err, err
    (folder / "fold1_seed0" / "best.pt").rename(folder / "fold1_seed0" / "old.pt")
    assert load_predictor(folder)[1]["members"] == ["fold0_seed0/best.pt"]
    code, _, err = cli(capsys, *args, "--resume")  # another ensemble: predicted again
    assert code == 0 and "kept" not in err, err
    assert labels_info(tmp_path / "out" / "a.tif")["made_by"]["sha256"] != made_by["sha256"]


def test_an_ensemble_of_models_that_do_not_fit_together_is_one_line(tmp_path, capsys):
    folder, _ = cv_folder(tmp_path, names=["x", "y", "z"])
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint8))
    (tmp_path / "empty").mkdir()
    for source, message in (
            (folder, "fold1_seed0/best.pt has classes ['x', 'y', 'z'], "),
            (tmp_path / "empty", "is a folder without checkpoints: give a best.pt, or a "
                                 "cellseg cv folder")):
        code, _, err = cli(capsys, "predict", source, image, "--out", tmp_path / "out")
        assert code != 0 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "out").exists()


def test_combined_input_rules():
    assert combined_rules("cv", [InputRules(16, 128), InputRules(32, 64)]) == InputRules(32, 128)
    assert combined_rules("cv", [InputRules(1, 1, 224)] * 2) == InputRules(1, 1, 224)
    with pytest.raises(DataError, match="its models take different input sizes"):
        combined_rules("cv", [InputRules(1, 1, 224), InputRules(32, 32)])
