import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SSTEM = SHARED / "data" / "sstem"

# A small encoder per arch so that every arch builds and runs quickly on a CPU.
SMALL_ENCODER = {"segformer": "mit_b0", "dpt": "tu-vit_tiny_patch16_224"}
# PAN's feature pyramid attention needs at least 128 px; everything else runs at 64.
MIN_SIZE = {"pan": 128}


def small_spec(arch: str) -> str:
    if arch == "classic_unet":
        return "classic_unet(width=4)"
    enc = SMALL_ENCODER.get(arch, "resnet18")
    extra = ",img_size=64" if arch == "dpt" else ""
    return f"{arch}(encoder='{enc}'{extra})"


@pytest.fixture
def sstem_root():
    if not (SSTEM / "stack1" / "raw").is_dir():
        pytest.skip("../shared/data/sstem is not present")
    return SSTEM
