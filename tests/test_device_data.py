"""Device-resident data: the same crops and the same augmentation distribution as the loader."""

import numpy as np
import pytest
import torch

from cellseg_plugins.engine.data import IGNORE, CropDataset, SourceSet, crop_starts, load_data
from cellseg_plugins.engine.device_data import DeviceCrops, augment


@pytest.fixture(scope="module")
def sources():
    return load_data("synthetic")


def dataset(sources, augment=False, seed=0):
    return CropDataset(sources, list(range(4, 8)), 64, [0.5], [0.2], augment=augment, seed=seed)


def test_device_crops_are_the_loaders_crops(sources):
    ds = dataset(sources)
    crops = DeviceCrops(ds, torch.device("cpu"))
    xs, ys = zip(*crops.batches(10))
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == len(ds) == 64 and y.dtype == torch.int64
    for k in (0, 17, 63):
        ref_x, ref_y = ds[k]
        assert torch.allclose(x[k], ref_x, atol=1e-6) and torch.equal(y[k], ref_y)


def test_every_crop_once_per_epoch_in_a_seeded_order(sources):
    crops = DeviceCrops(dataset(sources, seed=3), torch.device("cpu"))
    order, _, _ = crops.draws(epoch=5, shuffle=True)
    assert sorted(order.tolist()) == list(range(64))
    assert torch.equal(order, crops.draws(epoch=5, shuffle=True)[0])
    assert not torch.equal(order, crops.draws(epoch=6, shuffle=True)[0])


def test_rank_shards_cover_the_epoch_once(sources):
    crops = DeviceCrops(dataset(sources), torch.device("cpu"))
    seen = [torch.cat([y for _, y in crops.batches(8, epoch=2, shuffle=True, rank=r, world=3)])
            for r in range(3)]
    assert sum(len(s) for s in seen) == 64


def test_transform_choices_have_the_loader_paths_distribution(sources):
    """Quarter turns uniform over 0–3 and flips with probability ½, on both paths (200 epochs)."""
    crops = DeviceCrops(dataset(sources, augment=True), torch.device("cpu"))
    device_turns = torch.cat([crops.draws(e, True)[1] for e in range(200)])
    device_flips = torch.cat([crops.draws(e, True)[2] for e in range(200)])
    loader_turns, loader_flips = [], []
    for e in range(200):  # the loader path's draw, as CropDataset.__getitem__ makes it
        for k in range(64):
            g = torch.Generator().manual_seed(hash((0, e, k)) % 2**63)
            t, f = torch.randint(0, 4, (2,), generator=g).tolist()
            loader_turns.append(t)
            loader_flips.append(f % 2)
    n = 200 * 64
    for turns in (device_turns.numpy(), np.array(loader_turns)):
        counts = np.bincount(turns, minlength=4)
        assert np.all(np.abs(counts - n / 4) < 4 * np.sqrt(n * 0.25 * 0.75)), counts
    for flips in (device_flips.numpy(), np.array(loader_flips)):
        assert abs(flips.sum() - n / 2) < 4 * np.sqrt(n / 4)


def test_crop_positions_have_the_loader_paths_distribution(sources):
    """Each crop (source, y, x) is drawn once per epoch on both paths: flat histograms."""
    ds = dataset(sources, augment=True)
    crops = DeviceCrops(ds, torch.device("cpu"))
    first = torch.stack([crops.draws(e, True)[0][0] for e in range(640)])  # first crop per epoch
    counts = np.bincount(first.numpy(), minlength=64)
    assert counts.min() > 0 and counts.max() < 30  # uniform: 10 ± 4σ


def test_batched_augmentation_equals_per_sample_transforms():
    torch.manual_seed(0)
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6, 5, 5))
    turns, flips = torch.tensor([0, 1, 2, 3, 1, 0]), torch.tensor([1, 0, 1, 1, 0, 0])
    ax, ay = augment(x, y, 2 * turns + flips)
    for i in range(6):
        rx, ry = torch.rot90(x[i], int(turns[i]), (1, 2)), torch.rot90(y[i], int(turns[i]), (0, 1))
        if flips[i]:
            rx, ry = rx.flip(2), ry.flip(1)
        assert torch.equal(ax[i], rx) and torch.equal(ay[i], ry)


def test_cutting_batches_never_waits_for_the_device(sources):
    """On CUDA an op whose output size depends on the data (nonzero, item) or a blocking
    copy from the host makes Python wait for the GPU, so the next step cannot be queued
    while this one runs. The epoch's draws are copied once; per batch, only ops of fixed
    shape run (the same number for every full batch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    crops = DeviceCrops(dataset(sources, augment=True), torch.device("cpu"))
    batches = crops.batches(8, epoch=1, shuffle=True)
    per_batch = []
    next(batches)  # the epoch's draws
    for _ in range(7):
        with Ops() as ops:
            x, y = next(batches)
        per_batch.append(ops.names)
    syncing = {"nonzero.default", "_local_scalar_dense.default", "masked_select.default"}
    assert not syncing & {name for names in per_batch for name in names}
    assert len({len(names) for names in per_batch}) == 1 and x.shape == (8, 1, 64, 64)


@pytest.mark.parametrize("h, w", [(96, 96), (100, 70), (64, 130)])
def test_crops_cover_every_pixel_and_evaluation_counts_each_once(h, w):
    """Sides the crop does not divide get a crop flush with the far edge (the remainder was
    never trained on or evaluated); in validation / test sets its pixels that the grid
    covers already are IGNORE, so every pixel counts exactly once, on both data paths."""
    rng = np.random.default_rng(0)
    sources = SourceSet([rng.random((h, w), dtype=np.float32)],
                        [rng.integers(0, 3, (h, w))], ("a", "b", "c"))
    for count_once in (False, True):
        ds = CropDataset(sources, [0], 32, [0.5], [0.2], count_once=count_once)
        times = np.zeros((h, w), int)  # reference: how often each pixel is counted
        for k, (_, y, x, _) in enumerate(ds.items):
            image, mask = ds.cut(k)
            np.testing.assert_array_equal(image[0].numpy(), sources.images[0][y:y + 32, x:x + 32])
            kept = mask.numpy() != IGNORE
            np.testing.assert_array_equal(mask.numpy()[kept],
                                          sources.masks[0][y:y + 32, x:x + 32][kept])
            times[y:y + 32, x:x + 32] += kept
        divides = h % 32 == 0 and w % 32 == 0
        assert times.min() == 1 and (times.max() == 1) == (count_once or divides)
        device = torch.cat([y for _, y in DeviceCrops(ds, torch.device("cpu")).batches(5)])
        loader = torch.stack([ds[k][1] for k in range(len(ds))])
        assert torch.equal(device.masked_fill(device == 255, IGNORE), loader)
    assert crop_starts(100, 32) == [(0, 0), (32, 0), (64, 0), (68, 28)]
    assert crop_starts(96, 32) == [(0, 0), (32, 0), (64, 0)]
