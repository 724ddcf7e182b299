"""A split's crops held as tensors on the training device; batches cut with batched tensor ops.

The crops are the ones :class:`.data.CropDataset` yields (the same grid and masks), in
the same per-epoch shuffled order semantics: every crop once per epoch. Augmentation draws the
same distribution as the loader path (rot90 by 0–3 quarter turns, a left-right flip with
probability ½) from a CPU ``torch.Generator`` seeded by (seed, epoch), so a run is reproducible
and the device never waits on Python for a crop.
"""

from __future__ import annotations

import functools

import torch

from .data import CropDataset

# Splits up to this many bytes (images + masks) go to a CUDA device by default.
CUDA_BYTES = 2 << 30


class DeviceCrops:
    """Crops of ``sources[indices]``: images (N, C, crop, crop) float in [0, 1] and masks
    (N, crop, crop) uint8 on ``device``; normalised per batch with ``mean`` / ``std``."""

    def __init__(self, dataset: CropDataset, device: torch.device):
        images, masks = zip(*(dataset.cut(k) for k in range(len(dataset))))
        self.images = torch.stack(images).to(device)
        masks = torch.stack(masks)
        if len(dataset.sources.class_names) < 255:  # as uint8, IGNORE stored as 255
            masks = masks.masked_fill(masks < 0, 255).to(torch.uint8)
        self.masks = masks.to(device)
        self.mean = dataset.mean.view(1, -1, 1, 1).to(device)
        self.std = dataset.std.view(1, -1, 1, 1).to(device)
        self.augment, self.seed, self.device = dataset.augment, dataset.seed, device

    def __len__(self) -> int:
        return self.images.shape[0]

    def nbytes(self) -> int:
        return self.images.nbytes + self.masks.nbytes

    def draws(self, epoch: int, shuffle: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, quarter turns, flips) for one epoch, all (N,) on the CPU."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self)
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        if not self.augment:
            return order, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        return order, torch.randint(0, 4, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = False, rank: int = 0,
                world: int = 1):
        """Yield (x (B, C, crop, crop) float32 normalised, y (B, crop, crop) int64); rank r of
        ``world`` takes every world-th crop of the epoch's order. The epoch's draws go to the
        device in one copy, so cutting a batch never waits for the device."""
        draws = torch.stack(self.draws(epoch, shuffle))[:, rank::world].to(self.device)
        order, transforms = draws[0], 2 * draws[1] + draws[2]
        for start in range(0, order.shape[0], batch_size):
            idx = order[start:start + batch_size]
            x = (self.images[idx] - self.mean) / self.std
            y = self.masks[idx].long()  # IGNORE: 255 (uint8) or -1
            yield augment(x, y, transforms[start:start + batch_size]) if self.augment else (x, y)


@functools.lru_cache(maxsize=8)
def dihedral_maps(size: int, device: torch.device) -> torch.Tensor:
    """(8, size²) pixel maps: map 2k + f takes a flattened size × size crop to the crop rotated
    by k quarter turns (torch.rot90 over its two axes), then flipped left-right if f. Made
    once per (size, device); read-only."""
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(grid, k, (0, 1)).flip(1) if f else torch.rot90(grid, k, (0, 1))
                        for k in range(4) for f in range(2)]).flatten(1)


def augment(x: torch.Tensor, y: torch.Tensor, transforms: torch.Tensor):
    """Sample i rotated by transforms[i] // 2 quarter turns, then flipped left-right where
    transforms[i] is odd; x (B, C, S, S), y (B, S, S), ``transforms`` (B,) on their device.
    One gather each through :func:`dihedral_maps`: no per-sample Python, no device sync."""
    b, c, h, w = x.shape
    if h != w:
        raise ValueError(f"augment: crops must be square, got {h}×{w}")
    idx = dihedral_maps(h, x.device)[transforms]  # (B, S²)
    return (x.flatten(2).gather(2, idx[:, None].expand(b, c, h * w)).view_as(x),
            y.flatten(1).gather(1, idx).view_as(y))


def fits_on_device(crops: int, crop: int, channels: int, device: torch.device) -> bool:
    """Whether ``crops`` crops of ``crop``² pixels (float32 images of ``channels`` channels,
    uint8 masks) belong on ``device`` by default: always on the CPU (they are in memory
    already), up to :data:`CUDA_BYTES` on a GPU."""
    return device.type == "cpu" or crops * crop ** 2 * (4 * channels + 1) <= CUDA_BYTES
