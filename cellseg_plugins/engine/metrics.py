"""IoU from a confusion matrix accumulated over all pixels of a split (not per image)."""

from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts on the inputs' device; rows = truth, columns =
    prediction. Targets outside [0, classes) (ignored pixels) are not counted."""
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    counted = (target >= 0) & (target < classes)
    # where, not a boolean mask (whose size the host would wait for); on CUDA, bincount
    # itself still reads its input's min and max back to the host, once per call
    idx = torch.where(counted, target * classes + pred, classes * classes)
    bins = torch.bincount(idx, minlength=classes * classes + 1)
    return bins[:classes * classes].reshape(classes, classes)


def scores(matrix: torch.Tensor, class_names) -> dict:
    """{"miou", "iou": {name: IoU}, "pixel_accuracy"}; IoU = TP / (TP + FP + FN)."""
    m = matrix.double()
    tp = m.diag()
    denom = m.sum(0) + m.sum(1) - tp
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.nan)
    present = ~torch.isnan(iou)
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "iou": {name: (None if torch.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
        "pixel_accuracy": float(tp.sum() / m.sum().clamp(min=1)),
    }
