"""--init from weights made outside cellseg: smp state dicts, save_pretrained folders, the Hub."""

import pytest
import torch

import cellseg_plugins as cs
from cellseg_plugins.engine.init_weights import init_from, read_init
from cellseg_plugins.errors import DataError
from conftest import FAST, TINY, cli


def smp_model(in_channels=1, classes=5, seed=1):
    """An smp Unet as a user builds it (cellseg's `unet` arch is smp's class), random weights."""
    torch.manual_seed(seed)
    model = cs.create_model(TINY, in_channels=in_channels, classes=classes)
    with torch.no_grad():
        for p in model.parameters():  # BatchNorm's ones and zeros too: no tensor as built
            p.add_(0.05 * torch.randn_like(p))
    return model


def loaded(model, source):
    """A fresh TINY model of ``model``'s shape, --init from ``source``: (model, fresh, summed)."""
    target = cs.create_model(TINY, in_channels=1, classes=5)
    fresh, summed = init_from(target, read_init(str(source)), str(source))
    return target, fresh, summed


@pytest.mark.parametrize("saved_as", ["state_dict.pt", "lightning.ckpt", "ddp.pth",
                                      "weights.safetensors", "save_pretrained"])
def test_init_reads_the_ways_smp_weights_are_saved(tmp_path, saved_as):
    from safetensors.torch import save_file

    theirs = smp_model()
    state, path = theirs.state_dict(), tmp_path / saved_as
    if saved_as == "state_dict.pt":
        torch.save(state, path)
    elif saved_as == "lightning.ckpt":  # Lightning: the module's model attribute, beside hparams
        torch.save({"epoch": 3, "hyper_parameters": {"lr": 1e-3},
                    "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    elif saved_as == "ddp.pth":  # a DDP model's own state dict, beside a tensor of the loop's
        torch.save({"step": torch.tensor(7),
                    "model_state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif saved_as == "weights.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        theirs.save_pretrained(path)
    target, fresh, summed = loaded(theirs, path)
    assert fresh == [] and summed == []
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key
    if saved_as == "save_pretrained":
        assert read_init(str(path)).holds == "smp Unet(encoder_name='plain4')"


def test_a_colour_models_first_conv_starts_a_grey_model_as_the_grey_image_repeated(tmp_path):
    theirs = smp_model(in_channels=3, classes=2).eval()
    torch.save(theirs.state_dict(), tmp_path / "rgb.pt")
    ours, fresh, summed = loaded(theirs, tmp_path / "rgb.pt")
    first = [k for k, v in theirs.state_dict().items() if v.dim() == 4][0]
    assert summed == [first]
    assert set(fresh) == {k for k in ours.state_dict() if k.startswith("segmentation_head")}
    head = {k: v for k, v in theirs.state_dict().items() if k.startswith("segmentation_head")}
    ours = cs.create_model(TINY, in_channels=1, classes=2)  # the same with a 2-class head
    init_from(ours, read_init(str(tmp_path / "rgb.pt")), "rgb.pt")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in head.items())
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(grey), theirs(grey.repeat(1, 3, 1, 1)))


def test_init_downloads_hf_hub_repositories_as_smp_from_pretrained_does(tmp_path, monkeypatch):
    import huggingface_hub

    theirs = smp_model()
    theirs.save_pretrained(tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    target, fresh, _ = loaded(theirs, "hf-hub:someone/em-unet")
    assert asked[0][0] == "someone/em-unet" and "model.safetensors" in asked[0][1]
    assert fresh == [] and all(torch.equal(v, theirs.state_dict()[k])
                               for k, v in target.state_dict().items())

    def offline(repo_id, allow_patterns):
        raise OSError("We have no connection\nor proxy")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match=r"^checkpoint 'hf-hub:someone/em-unet': download "
                                        r"failed \(OSError: We have no connection or proxy\)$"):
        read_init("hf-hub:someone/em-unet")
    with pytest.raises(DataError, match="expected hf-hub:OWNER/NAME"):
        read_init("hf-hub:em-unet")


def test_init_from_outside_cellseg_on_the_command_line(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.save(smp_model(in_channels=3).state_dict(), tmp_path / "rgb.pt")
    code, _, err = cli(capsys, "train", TINY, "--init", tmp_path / "rgb.pt", "--epochs", "1",
                       "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    assert (f"fine-tuning from {tmp_path / 'rgb.pt'}: 110 of 110 tensors (summed over input "
            "channels: encoder.stem.0.weight)") in " ".join(err.split()), err
    torch.save(smp_model(), tmp_path / "whole.pt")
    torch.save({"epoch": 3, "lr": 1e-3}, tmp_path / "none.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "empty").mkdir()
    save_file({"w": torch.zeros(3)}, tmp_path / "other.safetensors")
    for init, message in (
            ("whole.pt", "holds pickled Python objects, not only tensors (cellseg loads no "
                         "pickled code): a whole model saved with torch.save? save its "
                         "state_dict()"),
            ("none.pt", "holds no tensors by name (expected a cellseg checkpoint, a state dict"),
            ("junk.safetensors", "is unreadable ("),
            ("empty", "is a folder without weights (expected a cellseg checkpoint"),
            ("other.safetensors", "only 0 of this model's 110 tensors are in it (it holds a "
                                  "state dict of other.safetensors)")):
        code, _, err = cli(capsys, "train", TINY, "--init", tmp_path / init,
                           "--out", tmp_path / "bad", *FAST)
        assert code != 0 and err.count("\n") == 1 and message in err, (init, err)
        assert not (tmp_path / "bad").exists()
