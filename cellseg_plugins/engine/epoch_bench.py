"""``cellseg bench --epoch``: the engine's training epoch against a bare PyTorch loop.

The engine epoch is what ``cellseg train`` runs (training, validation, checkpoints, metrics
files). The bare loop (:func:`bare_epoch`, written here without engine code) is what a user
would write: the same model, crops, batch size, optimiser, loss, precision and memory format
(channels-last when the engine's is), shuffled batches with random rot90/flip, then an
argmax-and-bincount validation. The two alternate epoch by epoch so that both see the same
machine load.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from ..registry import create_model
from .config import TrainConfig
from .train import DTYPES, Trainer


def cut_crops(images: list[np.ndarray], masks: list[np.ndarray], indices: list[int], crop: int,
              mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of the given sources, (N, C, crop, crop) normalised, (N, crop, crop): a grid,
    plus crops flush with the far edges where ``crop`` does not divide a side."""
    def starts(size):
        return [*range(0, size - crop + 1, crop), *([size - crop] if size % crop else [])]

    xs, ys = [], []
    for i in indices:
        h, w = masks[i].shape
        for y in starts(h):
            for x in starts(w):
                image = torch.from_numpy(images[i][y:y + crop, x:x + crop])
                xs.append(image[None] if image.ndim == 2 else image.permute(2, 0, 1))
                ys.append(torch.from_numpy(masks[i][y:y + crop, x:x + crop]))
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (torch.stack(xs) - m) / s, torch.stack(ys)


def bare_epoch(model, optimizer, train, val, batch_size, device, dtype=None,
               net=None, channels_last=False, cudagraphs=False) -> float:
    """One plain epoch (train + validation mIoU); returns the validation mIoU. ``net`` (a
    compiled ``model``) runs the training steps; validation runs ``model``, as the engine's.
    With ``channels_last`` each batch goes to the device in that memory format; with
    ``cudagraphs`` (``net`` compiled with mode="reduce-overhead") each step begins with
    torch.compiler.cudagraph_mark_step_begin(), as torch's docs ask of a training loop."""
    (x_train, y_train), (x_val, y_val) = train, val
    net = model if net is None else net
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net.train()
    for idx in torch.randperm(len(x_train)).split(batch_size):
        x, y = x_train[idx], y_train[idx]
        k, flip = np.random.randint(4), np.random.randint(2)  # one transform per batch
        x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (1, 2))
        if flip:
            x, y = x.flip(3), y.flip(2)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            x = x.to(device).contiguous(memory_format=layout)
            loss = torch.nn.functional.cross_entropy(net(x).float(), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    n = int(y_val.max()) + 1
    counts = torch.zeros(n * n, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for x, y in zip(x_val.split(batch_size), y_val.split(batch_size)):
            pred = model(x.to(device).contiguous(memory_format=layout)).argmax(1)
            counts += torch.bincount(y.to(device).flatten() * n + pred.flatten(), minlength=n * n)
    m = counts.view(n, n).double().cpu()
    return float((m.diag() / (m.sum(0) + m.sum(1) - m.diag()).clamp(min=1)).mean())


def run_epoch_bench(cfg: TrainConfig, epochs: int = 3, progress=None) -> dict:
    """Alternate engine and bare epochs (one warm-up each, then ``epochs`` timed).

    The engine runs as ``cellseg train`` runs: one ``Trainer.run`` over all epochs (files
    written per epoch, curves at most every PLOT_EVERY_S seconds and after the last); each
    bare epoch runs inside its epoch callback, so an engine epoch is the time from the end
    of one bare epoch to the end of the engine's next epoch (its files included)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(replace(cfg, out=f"{tmp}/run", epochs=1 + epochs))
        split, sources = trainer.split, trainer.sources
        train = cut_crops(sources.images, sources.masks, split["train"], cfg.crop,
                          trainer.mean, trainer.std)
        val = cut_crops(sources.images, sources.masks, split["val"], cfg.crop,
                        trainer.mean, trainer.std)
        torch.manual_seed(cfg.seed)
        model = create_model(trainer.cfg.spec, in_channels=sources.in_channels,
                             classes=len(sources.class_names)).to(trainer.device)
        if trainer.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = (torch.optim.Adam(model.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
                     else torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9))
        dtype = DTYPES.get(trainer.precision)
        net = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
        times = {"engine": [], "bare": [], "files": []}
        mark = [time.perf_counter()]
        save = trainer.save

        def timed_save(improved):  # the engine's files: checkpoints, metrics, curves
            _sync(trainer.device)
            t = time.perf_counter()
            save(improved)
            times["files"].append(time.perf_counter() - t)

        trainer.save = timed_save

        def bare_after(row):
            _sync(trainer.device)
            t1 = time.perf_counter()
            with trainer.paused():  # the engine's file intervals count only its own time
                bare_epoch(model, optimizer, train, val, cfg.batch_size, trainer.device, dtype,
                           net, trainer.channels_last,
                           cfg.compile and cfg.compile_mode == "reduce-overhead")
                _sync(trainer.device)
            t2 = time.perf_counter()
            if row["epoch"] > 1:  # the first epoch of each is the warm-up
                times["engine"].append(t1 - mark[0])
                times["bare"].append(t2 - t1)
            mark[0] = t2
            if progress:
                progress(row["epoch"], 1 + epochs)

        trainer.run(on_epoch=bare_after)
        images = len(train[0]) + len(val[0])
        engine, bare = statistics.median(times["engine"]), statistics.median(times["bare"])
        return {"spec": trainer.cfg.spec, "data": cfg.data, "device": str(trainer.device),
                "precision": trainer.precision, "channels_last": trainer.channels_last,
                "data_on_device": trainer.on_device,
                "compile": cfg.compile and cfg.compile_mode,
                "crop": cfg.crop, "batch_size": cfg.batch_size, "epochs": epochs,
                "train_crops": len(train[0]), "val_crops": len(val[0]),
                "torch_threads": torch.get_num_threads(),
                "engine_epoch_s": engine, "bare_epoch_s": bare, "ratio": engine / bare,
                "engine_files_s": statistics.median(times["files"][1:]),
                "engine_images_per_s": images / engine, "bare_images_per_s": images / bare,
                "engine_epochs_s": times["engine"], "bare_epochs_s": times["bare"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
