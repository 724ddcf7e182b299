"""Checkpoints that are not cellseg's or do not rebuild: one line, exit 2."""

import torch

from cellseg_plugins.engine.checkpoint import load_checkpoint
from cellseg_plugins.engine.train import Trainer
from conftest import TINY, cli, tiny_config


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
