"""Checkpoints that are not cellseg's or do not rebuild: one line, exit 2."""

import pytest
import torch

from cellseg_plugins.engine.checkpoint import load_checkpoint, model_from_checkpoint
from cellseg_plugins.engine.data import DataError
from cellseg_plugins.registry import create_model
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


def _fpn_lfa_checkpoint(decoder_norm):
    torch.manual_seed(0)
    trained = create_model(f"fpn(encoder='plain4')+lfa(m=3,decoder_norm='{decoder_norm}')",
                           classes=3).eval()
    ckpt = {"spec": "fpn(encoder='plain4')+lfa(m=3)", "in_channels": 1,
            "class_names": ["a", "b", "c"], "model": trained.state_dict()}
    return trained, ckpt


def test_checkpoint_from_before_lfa_decoder_norm_rebuilds_as_it_was_trained():
    """fpn + lfa saved before decoder_norm has no BatchNorm on Q: it loads as 'none'."""
    trained, ckpt = _fpn_lfa_checkpoint("none")
    model = model_from_checkpoint(ckpt).eval()
    assert ckpt["spec"] == "fpn(encoder='plain4')+lfa(m=3,decoder_norm='none')"
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(model(x), trained(x))


def test_checkpoint_with_lfa_decoder_norm_keeps_its_spec():
    trained, ckpt = _fpn_lfa_checkpoint("batch")  # what 'auto' builds on FPN
    model_from_checkpoint(ckpt)
    assert ckpt["spec"] == "fpn(encoder='plain4')+lfa(m=3)"


def test_checkpoint_missing_more_than_lfa_decoder_norm_does_not_rebuild():
    _, ckpt = _fpn_lfa_checkpoint("none")
    ckpt["model"].pop(next(k for k in ckpt["model"] if k.startswith("segmentation_head")))
    with pytest.raises(DataError, match="checkpoint does not rebuild: .*Missing key"):
        model_from_checkpoint(ckpt)
    assert ckpt["spec"] == "fpn(encoder='plain4')+lfa(m=3)"
