"""Each paper's training settings as a preset; the CLI fills only the options not given."""

import json

import pytest

from cellseg_plugins.cli.main import main
from cellseg_plugins.engine.data import DataError
from cellseg_plugins.engine.presets import PRESETS, apply_preset
from cellseg_plugins.engine.train import TrainConfig

# The papers' own words (../shared/papers), value by value.
PAPERS = {
    "fu": {"classes": "sstem4", "optimizer": "adam", "lr": 1e-4, "epochs": 1500,
           "batch_size": 16, "loss": "ce", "class_weights": "auto"},
    "fa": {"classes": "sstem4", "loss": "ce", "class_weights": "none"},
    "frem": {"classes": "sstem4", "epochs": 2000, "loss": "ce"},
    "lfa": {"classes": "sstem5", "optimizer": "adam", "lr": 1e-3, "epochs": 1500,
            "batch_size": 8, "loss": "focal+iou"},
}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_each_preset_holds_its_papers_values(name):
    preset = PRESETS[name]
    assert {k: preset.settings[k] for k in PAPERS[name]} == PAPERS[name]
    assert preset.settings["data"] == "sstem" and preset.settings["crop"] == 256
    cfg = apply_preset(TrainConfig(spec="classic_unet"), name)
    assert all(getattr(cfg, k) == v for k, v in preset.settings.items()) and cfg.preset == name


def test_explicit_options_win_over_the_preset():
    cfg = apply_preset(TrainConfig(spec="classic_unet", epochs=3), "lfa", {"epochs"})
    assert cfg.epochs == 3 and cfg.loss == "focal+iou"
    with pytest.raises(DataError, match="preset 'xyz': expected one of fu, fa, frem, lfa"):
        apply_preset(TrainConfig(spec="unet"), "xyz")


def test_cli_preset_fills_what_was_not_given(capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "classic_unet(width=4)", "--preset", "lfa", "--data", "synthetic",
              "--epochs", "1", "--crop", "64", "--batch-size", "32", "--device", "cpu",
              "--out", str(out)])
    assert e.value.code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["preset"], cfg["loss"], cfg["lr"], cfg["epochs"], cfg["crop"]) == (
        "lfa", "focal+iou", 1e-3, 1, 64)
    assert cfg["data"] == "synthetic" and cfg["classes"] is None  # --data given: kept


def test_cli_unknown_preset_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "unet", "--preset", "nope", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "preset 'nope'" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_eval_round_1_of_a_normally_trained_checkpoint(capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "classic_unet(width=4)+feedback_convlstm", "--epochs", "1", "--crop", "64",
              "--batch-size", "32", "--device", "cpu", "--out", str(out)])
    assert e.value.code == 0
    capsys.readouterr()
    results = {}
    for r in ("1", "2"):
        with pytest.raises(SystemExit):
            main(["eval", str(out / "best.pt"), "--round", r, "--json"])
        results[r] = json.loads(capsys.readouterr().out)["miou"]
    assert results["1"] != results["2"]
    with pytest.raises(SystemExit) as e:
        main(["train", "classic_unet(width=4)", "--epochs", "1", "--crop", "64",
              "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path / "plain")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "plain" / "best.pt"), "--round", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "two-round" in err and err.count("\n") == 1
