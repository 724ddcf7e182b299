"""Test-time augmentation: a model's class probabilities averaged over flips and 90° rotations
of its input, each mapped back before the average (nnU-Net mirrors its inputs so at inference).

``flips``: the image as it is, flipped left-right, up-down and both (4 passes); ``d4``: those
and their 90° rotations, the eight transforms training augments with (``--augment``: random
rot90 and flips), 8 passes. Square inputs keep their shape under every transform; a model that
takes only its training size (DPT) gets square tiles and crops from predict and eval.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

# (quarter turns, flip left-right first) of each kind; a flip up-down is 2 turns of a left-right
TRANSFORMS = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": tuple((k, flip) for flip in (False, True) for k in range(4)),
}


def check_tta(kind: str) -> str:
    if kind not in TRANSFORMS:
        raise ConfigError("tta", kind, f"expected {', '.join(TRANSFORMS)}")
    return kind


def transform(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """(..., H, W) flipped left-right (if ``flip``), then turned ``turns`` quarter turns."""
    return (x.flip(-1) if flip else x).rot90(turns, (-2, -1))


def untransform(y: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`transform`: its output's pixels back where the input's were."""
    y = y.rot90(-turns, (-2, -1))
    return y.flip(-1) if flip else y


def averaged_probabilities(model, x: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, C_in, H, W) → (N, classes, H, W): the mean of ``model``'s softmax over the
    transforms of ``kind``, each mapped back."""
    total = None
    for turns, flip in TRANSFORMS[kind]:
        p = untransform(model(transform(x, turns, flip)).float().softmax(1), turns, flip)
        total = p if total is None else total + p
    return total / len(TRANSFORMS[kind])


class TestTimeAugmented:
    """``model`` with test-time augmentation, called as the model is: (N, C_in, H, W) →
    (N, classes, H, W), the log of the averaged probabilities (their softmax and argmax are
    the averaged probabilities' own). Wraps PyTorch models and ONNX Runtime ones alike."""

    __test__ = False  # not a pytest class

    def __init__(self, model, kind: str):
        self.model, self.kind = model, check_tta(kind)

    def eval(self) -> "TestTimeAugmented":
        self.model.eval()
        return self

    def parameters(self):
        return getattr(self.model, "parameters", list)()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return averaged_probabilities(self.model, x, self.kind).clamp_min(1e-30).log()


def with_tta(model, kind: str):
    """``model`` itself for ``kind`` "none", else wrapped in :class:`TestTimeAugmented`."""
    return model if check_tta(kind) == "none" else TestTimeAugmented(model, kind)
