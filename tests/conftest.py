import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (`-n 2`: one worker per core) each worker and its subprocesses take one
# thread, so that the workers do not oversubscribe the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SSTEM = SHARED / "data" / "sstem"

# A small encoder per arch so that every arch builds and runs quickly on a CPU.
SMALL_ENCODER = {"segformer": "mit_b0", "dpt": "tu-vit_tiny_patch16_224"}
# PAN's feature pyramid attention needs at least 128 px; everything else runs at 64.
MIN_SIZE = {"pan": 128}
# Arguments that keep a plugin small in the grids; every registered plugin is in the grids.
SMALL_ARGS = {"lfa": "(m=3)", "feedback_attention": "(connection='conv')"}
# Every registered plugin in five small models (a model has at most one rounds plugin): what
# the compile and export tests build. LFA at the shallowest and deepest skip only; the rounds
# plugins (two passes through the network) on a two-level U-Net, which halves the graphs that
# torch.export and torch.compile trace.
EVERY_PLUGIN = [
    "classic_unet(width=4)+attention_gate+bottleneck_attention+scse+lfa(m=3,stages=(0,3))",
    "classic_unet(width=4,depth=2)+frem(B=2)+bottleneck_supervision+bottleneck_dropout"
    "+feedback_convlstm",
    "classic_unet(width=4,depth=2)+feedback_self",
    "classic_unet(width=4,depth=2)+feedback_st",
    "classic_unet(width=4,depth=2)+feedback_attention(connection='se')",
]
# The engine tests' model and options: a tiny U-Net, 64² crops, one batch per epoch.
TINY = "unet(encoder='plain4')"
FAST = ["--crop", "64", "--batch-size", "32", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="session")
def _listing_cache(tmp_path_factory):
    """`cellseg list` run in subprocesses caches its listing here, not in ~/.cache."""
    os.environ["CELLSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cellseg-cache"))


def cli(capsys, *argv):
    """Run ``cellseg ARGV`` in this process: (exit code, stdout, stderr)."""
    from cellseg_plugins.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def tiny_config(out, epochs=2, spec=TINY, **kw):
    from cellseg_plugins.engine.train import TrainConfig

    return TrainConfig(spec=spec, epochs=epochs, crop=64, batch_size=32, device="cpu",
                       out=str(out), **kw)


def grid_plugins() -> list[str]:
    """Every registered plugin as a spec term (with SMALL_ARGS), so new plugins join the grids."""
    import cellseg_plugins as cs

    return [name + SMALL_ARGS.get(name, "") for name in cs.list_plugins()]


def small_spec(arch: str) -> str:
    if arch == "classic_unet":
        return "classic_unet(width=4)"
    enc = SMALL_ENCODER.get(arch, "resnet18")
    extra = ",img_size=64" if arch == "dpt" else ""
    return f"{arch}(encoder='{enc}'{extra})"


def checkpoint(tmp_path, spec, name="model.pt", classes=3, in_channels=1):
    """A checkpoint as training writes it, of a model with BatchNorm statistics that are not
    0/1 (one forward in training mode); returns (path, the model in eval mode)."""
    import cellseg_plugins as cs
    from cellseg_plugins.engine.checkpoint import FORMAT

    torch.manual_seed(0)
    model = cs.create_model(spec, in_channels=in_channels, classes=classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, in_channels, 64, 64))
    ckpt = {"format": FORMAT, "spec": model.cellseg_spec, "in_channels": in_channels,
            "class_names": [f"c{i}" for i in range(classes)],
            "norm": {"mean": [0.5] * in_channels, "std": [0.2] * in_channels},
            "model": model.state_dict(),
            "config": {"data": "synthetic"}}
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name, model.eval()


@pytest.fixture
def sstem_root():
    if not (SSTEM / "stack1" / "raw").is_dir():
        pytest.skip("../shared/data/sstem is not present")
    return SSTEM
