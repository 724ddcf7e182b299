"""Tiled inference on images of any size, with overlap blending and padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from torch.nn import functional as F

from .data import DataError, SUFFIXES, _to_unit, read_image

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                    [250, 190, 212]], dtype=np.uint8)


def _ramp(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) blending weights: 1 inside, linear ramp over ``overlap`` pixels at edges."""
    w = torch.ones(tile)
    if overlap > 0:
        edge = torch.linspace(1.0 / (overlap + 1), 1.0, overlap + 1)[:-1]
        w[:overlap], w[tile - overlap:] = edge, edge.flip(0)
    return w[:, None] * w[None, :]


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def predict_image(model, image: np.ndarray, mean, std, tile: int = 256, overlap: int = 32,
                  multiple: int = 32, device="cpu") -> np.ndarray:
    """Label map (H, W) uint8 for one image (H, W[, C]) float in [0, 1].

    Tiles of ``tile`` px overlapping by ``overlap`` px; softmax probabilities are blended with
    linear edge ramps. Images or tiles not divisible by ``multiple`` are reflect-padded.
    """
    model.eval()
    x = torch.from_numpy(image)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    _, h, w = x.shape
    tile = min(tile, max(h, w))
    tile = -(-tile // multiple) * multiple
    ph, pw = max(tile, h), max(tile, w)
    mode = "reflect" if ph - h < h and pw - w < w else "replicate"  # reflect needs pad < size
    x = F.pad(x[None], (0, pw - w, 0, ph - h), mode=mode)
    step = max(1, tile - overlap)
    weight = _ramp(tile, min(overlap, tile // 2))
    probs, norm = None, torch.zeros(ph, pw)
    for y0 in _starts(ph, tile, step):
        for x0 in _starts(pw, tile, step):
            patch = x[:, :, y0:y0 + tile, x0:x0 + tile].to(device)
            p = model(patch).softmax(1)[0].cpu()
            if probs is None:
                probs = torch.zeros(p.shape[0], ph, pw)
            probs[:, y0:y0 + tile, x0:x0 + tile] += p * weight
            norm[y0:y0 + tile, x0:x0 + tile] += weight
    return (probs / norm).argmax(0)[:h, :w].numpy().astype(np.uint8)


def iter_inputs(inputs: list[str]):
    """(name, image float (H, W[, C])) for files, folders and every page of TIFF stacks."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"input {item!r} does not exist")
    if not paths:
        raise DataError(f"no PNG or TIFF images in {', '.join(inputs)}")
    for p in paths:
        a = read_image(p)
        stack = (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.ndim == 4
        yield p, ([_to_unit(page) for page in a] if stack else [_to_unit(a)]), stack


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    grey = image if image.ndim == 2 else image.mean(-1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1).astype(np.float32)
    colours = PALETTE[labels % len(PALETTE)].astype(np.float32)
    return ((1 - alpha) * rgb + alpha * colours).astype(np.uint8)


def write_labels(path: Path, pages: list[np.ndarray]) -> None:
    tifffile.imwrite(path, np.stack(pages) if len(pages) > 1 else pages[0])
