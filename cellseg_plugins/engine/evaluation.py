"""Evaluate a checkpoint on a split of its data (or on other data)."""

from __future__ import annotations

import torch

from ..registry import PluginConfigError
from ..rounds import set_prediction_round
from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import CropDataset, DataError, load_data
from .metrics import scores
from .train import evaluate, resolve_device


def evaluate_checkpoint(path, data: str | None = None, split: str = "test",
                        device: str = "auto", round: int | None = None) -> dict:
    """{"miou", "iou": {class: IoU}, "pixel_accuracy", "crops", "spec"} over all pixels.

    With the checkpoint's own data, ``split`` picks its test or validation sources; with other
    ``data``, every image of it is used. ``round`` (1 or 2) evaluates that round of a
    two-round model (the FA paper's Table 4), default the one its spec predicts.
    """
    if split not in ("test", "val"):
        raise DataError(f"--split {split!r}: expected test or val")
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    target = data or cfg["data"]
    sources = load_data(target, cfg["classes"] if target == "sstem" else None,
                        cfg["class_map"] if target not in ("synthetic", "sstem") else None,
                        cfg["seed"])
    if list(sources.class_names) != ckpt["class_names"]:
        raise DataError(f"data classes {list(sources.class_names)} differ from the "
                        f"checkpoint's {ckpt['class_names']}")
    own = data in (None, cfg["data"])
    indices = ckpt["split"][split] if own else list(range(len(sources.images)))
    dataset = CropDataset(sources, indices, cfg["crop"], ckpt["norm"]["mean"], ckpt["norm"]["std"])
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    if round is not None:
        try:
            set_prediction_round(model, round)
        except PluginConfigError as e:
            raise DataError(f"round={round}: {e}") from None
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    result = scores(evaluate(model, loader, len(ckpt["class_names"]), dev), ckpt["class_names"])
    return {**result, "crops": len(dataset), "spec": ckpt["spec"]}
