"""Evaluate a checkpoint on a split of its data (or on other data)."""

from __future__ import annotations

import torch

from ..registry import PluginConfigError
from ..rounds import set_prediction_round
from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import CropDataset, DataError, load_data, parse_class_map
from .device_data import DeviceCrops, fits_on_device
from .metrics import scores
from .train import evaluate, resolve_device
from .tta import check_tta, with_tta


def evaluate_checkpoint(path, data: str | None = None, split: str = "test",
                        device: str = "auto", round: int | None = None,
                        classes: str | None = None, class_map: str | None = None,
                        data_on_device: bool | None = None, tta: str = "none") -> dict:
    """{"miou", "iou": {class: IoU}, "pixel_accuracy", "images", "crops", "spec"} over all
    pixels of the split's images, each counted once.

    With the checkpoint's own data, ``split`` picks its test or validation sources; with other
    ``data``, every image of it is used. ``classes`` / ``class_map`` take the values training
    took; given for the training data they must be the same, for other data they map its
    masks to the model's classes. ``round`` (1 or 2) evaluates that round of a two-round
    model (the FA paper's Table 4), default the one its spec predicts. ``tta`` (flips, d4)
    averages each crop's probabilities over flips and rotations (:mod:`.tta`). The crops are held on
    the device when they fit, as training holds its splits (``data_on_device`` overrides), so
    no batch waits for a copy from the host.
    """
    if split not in ("test", "val"):
        raise DataError(f"--split {split!r}: expected test or val")
    check_tta(tta)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    target = data or cfg["data"]
    own = target == cfg["data"]
    trained = {"classes": cfg["classes"] or ("sstem5" if cfg["data"] == "sstem" else None),
               "class_map": cfg["class_map"]}
    for name, given in (("classes", classes), ("class_map", class_map)):
        if given is not None and own and _canonical(name, given) != _canonical(
                name, trained[name]):
            flag = "--" + name.replace("_", "-")
            was = "none" if trained[name] is None else f"{flag} {trained[name]!r}"
            raise DataError(f"{flag} {given!r}: the model was trained with {was}")
    sources = load_data(target, (classes or trained["classes"]) if target == "sstem" else None,
                        (class_map or (cfg["class_map"] if own else None))
                        if target not in ("synthetic", "sstem") else class_map,
                        cfg["seed"])
    if list(sources.class_names) != ckpt["class_names"]:
        raise DataError(f"data classes {list(sources.class_names)} differ from the "
                        f"checkpoint's {ckpt['class_names']}")
    indices = ckpt["split"][split] if own else list(range(len(sources.images)))
    dataset = CropDataset(sources, indices, cfg["crop"], ckpt["norm"]["mean"], ckpt["norm"]["std"],
                          count_once=True)
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev, memory_format=torch.channels_last)  # as trained
    if round is not None:
        try:
            set_prediction_round(model, round)
        except PluginConfigError as e:
            raise DataError(f"round={round}: {e}") from None
    if data_on_device is None:
        data_on_device = fits_on_device(len(dataset), cfg["crop"], sources.in_channels, dev)
    batches = (DeviceCrops(dataset, dev).batches(8) if data_on_device else
               torch.utils.data.DataLoader(dataset, batch_size=8, pin_memory=dev.type == "cuda"))
    confusion = evaluate(with_tta(model, tta), batches, len(ckpt["class_names"]), dev)
    result = scores(confusion, ckpt["class_names"])
    return {**result, "images": len(indices), "crops": len(dataset), "spec": ckpt["spec"]}


def _canonical(name: str, value: str | None):
    """A --classes / --class-map value in a comparable form (class maps parsed)."""
    if name == "class_map" and value is not None:
        return parse_class_map(value)
    return value
