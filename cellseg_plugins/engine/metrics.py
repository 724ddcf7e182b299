"""IoU from a confusion matrix accumulated over all pixels of a split (not per image)."""

from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts on the inputs' device; rows = truth, columns =
    prediction. Targets outside [0, classes) (ignored pixels) are not counted."""
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    counted = (target >= 0) & (target < classes)
    # torch.where, not a boolean mask, and index_add_, not bincount: both keep the output's
    # size independent of the data, so on CUDA the host never waits on a value (bincount reads
    # its input's maximum back to size its output); uncounted pixels go to one spare bin
    idx = torch.where(counted, target * classes + pred, classes * classes)
    bins = torch.zeros(classes * classes + 1, dtype=torch.int64, device=idx.device)
    bins.index_add_(0, idx, torch.ones_like(idx))
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
