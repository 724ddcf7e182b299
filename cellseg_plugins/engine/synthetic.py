"""Built-in EM-like data: cells with membranes, mitochondria, synapse-like dots and noise.

Deterministic from a seed; uses the ssTEM five-class map so that everything downstream
(class names, metrics) matches the real data.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# class index → (name, mean grey level)
CLASSES = ("membrane", "mitochondria", "synapse", "extracellular", "intracellular")
GREY = np.array([0.22, 0.38, 0.10, 0.80, 0.62], dtype=np.float32)


def _smooth(img: np.ndarray, passes: int = 2) -> np.ndarray:
    """Cheap blur: repeated 3×3 box filter (edge padded)."""
    for _ in range(passes):
        p = np.pad(img, 1, mode="edge")
        img = sum(p[dy:dy + img.shape[0], dx:dx + img.shape[1]]
                  for dy in range(3) for dx in range(3)) / 9.0
    return img


def nearest_two(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For distances d (n, H, W): the index of the nearest (the first of equals), its distance
    and the second-smallest distance (equal to it in a tie), each (H, W); what a sort over
    axis 0 gives, without the sort."""
    owner = np.argmin(d, axis=0)
    nearest = np.take_along_axis(d, owner[None], axis=0)[0]
    second = np.where(np.arange(len(d))[:, None, None] == owner, np.inf, d).min(axis=0)
    return owner, nearest, second


def synthetic_image(seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32 in [0, 1], mask int64) pair of shape (size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n_cells = int(rng.integers(12, 22))
    centres = rng.uniform(0, size, (n_cells, 2)).astype(np.float32)
    d = np.sqrt((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2)
    owner, nearest, second = nearest_two(d)
    mask = np.full((size, size), 4, dtype=np.int64)  # intracellular
    extracellular_cells = rng.random(n_cells) < 0.12
    mask[extracellular_cells[owner]] = 3
    membrane = (second - nearest) < rng.uniform(2.0, 3.5)
    mask[membrane] = 0
    for _ in range(int(rng.integers(4, 9))):  # mitochondria: ellipses inside cells
        cy, cx = rng.uniform(0, size, 2)
        a, b = rng.uniform(5, 14), rng.uniform(3, 7)
        t = rng.uniform(0, np.pi)
        u = ((yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)) / a
        v = (-(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)) / b
        mask[(u ** 2 + v ** 2 < 1) & (mask == 4)] = 1
    boundary = np.argwhere(membrane)
    for idx in rng.choice(len(boundary), size=min(len(boundary), int(rng.integers(2, 6))), replace=False):
        cy, cx = boundary[idx]
        r = rng.uniform(2, 4)
        mask[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)] = 2
    image = GREY[mask]
    image = image + 0.05 * _smooth(rng.standard_normal((size, size)).astype(np.float32), 1)
    image = _smooth(image, 1) + 0.06 * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), mask


def synthetic_dataset(n: int = 20, size: int = 256, seed: int = 0):
    """``n`` deterministic source images and masks: copies of the arrays made once a process
    for each (n, size, seed), which a cross-validation's runs and their tests share."""
    images, masks = _synthetic_arrays(n, size, seed)
    return [a.copy() for a in images], [a.copy() for a in masks]


@lru_cache(maxsize=4)
def _synthetic_arrays(n: int, size: int, seed: int):
    pairs = [synthetic_image(seed * 10_000 + i, size) for i in range(n)]
    for pair in pairs:
        for array in pair:
            array.setflags(write=False)
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
