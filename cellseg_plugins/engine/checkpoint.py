"""Checkpoints: written atomically, rebuilt from the canonical spec they store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..registry import SpecError, create_model
from .data import DataError

FORMAT = "cellseg-checkpoint-1"


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file over ``path``, with the permissions a new file gets
    (mkstemp makes files readable by their owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary pickles
    except Exception as e:
        raise DataError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a cellseg checkpoint (expected format {FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    try:
        model = create_model(ckpt["spec"], in_channels=ckpt["in_channels"],
                             classes=len(ckpt["class_names"]))
        model.load_state_dict(ckpt["model"])
    except (SpecError, RuntimeError) as e:
        raise DataError(f"checkpoint does not rebuild: {' '.join(str(e).split())[:300]}") from None
    return model
