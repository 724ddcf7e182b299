"""Predicting with a cross-validation's models together (nnU-Net predicts with its five folds'
models so): every run's best.pt in a ``cellseg cv`` folder, their probabilities averaged."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import DataError
from ..input_rules import InputRules


def ensemble_members(folder: Path) -> list[Path]:
    """The best.pt of every run folder directly in ``folder`` (``cellseg cv``'s
    fold<f>_seed<s>/), sorted; [] where there is none."""
    return sorted(folder.glob("*/best.pt")) if folder.is_dir() else []


class Ensemble:
    """Models called as one: (N, C_in, H, W) scaled to [0, 1] → (N, classes, H, W), the log of
    the members' mean softmax. Each member normalises its input with its own training
    statistics (``norm``: each fold's training split has its own), so the ensemble's own
    normalisation is the identity (:func:`ensemble_meta`)."""

    def __init__(self, models: list, norms: list[dict]):
        self.models = models
        self.norms = [(torch.tensor(n["mean"]).view(1, -1, 1, 1),
                       torch.tensor(n["std"]).view(1, -1, 1, 1)) for n in norms]

    def eval(self) -> "Ensemble":
        for model in self.models:
            model.eval()
        return self

    def parameters(self):
        return getattr(self.models[0], "parameters", list)()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = 0
        for model, (mean, std) in zip(self.models, self.norms):
            total = total + model((x - mean.to(x.device)) / std.to(x.device)).float().softmax(1)
        return (total / len(self.models)).clamp_min(1e-30).log()


def ensemble_meta(folder: Path, members: list[Path], metas: list[dict]) -> dict:
    """One metadata dict for the members' (:func:`~.predict.load_predictor`'s): the same
    class names and input channels required (DataError naming the first that differs), the
    identity normalisation (:class:`Ensemble` normalises per member), the pixel size where
    all members share it (within 2 %)."""
    first = metas[0]
    for path, meta in zip(members[1:], metas[1:]):
        for key, what in (("class_names", "classes"), ("in_channels", "input channels")):
            if meta[key] != first[key]:
                raise DataError(f"{folder}: {path} has {what} {meta[key]!r}, {members[0]} "
                                f"{first[key]!r}; an ensemble's models must share them")
    sizes = [m.get("pixel_nm") for m in metas]
    shared = sizes[0] if sizes[0] and all(s and abs(s / sizes[0] - 1) <= 0.02 for s in sizes) \
        else None
    specs = list(dict.fromkeys(m["spec"] for m in metas))
    channels = first["in_channels"]
    return {"spec": " | ".join(specs), "class_names": first["class_names"],
            "in_channels": channels, "norm": {"mean": [0.0] * channels, "std": [1.0] * channels},
            "pixel_nm": shared, "members": [str(p.relative_to(folder)) for p in members]}


def combined_rules(folder: Path, rules: list[InputRules]) -> InputRules:
    """The input sides every member takes: a common multiple and the largest minimum, or the
    one fixed size they all take (DataError where they differ)."""
    fixed = {r.fixed for r in rules}
    if fixed != {None}:
        if len(fixed) > 1:
            raise DataError(f"{folder}: its models take different input sizes "
                            f"({', '.join(r.describe() for r in rules)})")
        return rules[0]
    return InputRules(math.lcm(*(r.multiple for r in rules)), max(r.minimum for r in rules))
