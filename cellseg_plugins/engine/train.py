"""The training loop: folds, losses, checkpoints, resume, metrics; plugins via the protocol only."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..registry import create_model, epoch_start, plugin_modules, step_start, training_loss
from . import distributed
from .checkpoint import (FORMAT, hold_folder, load_checkpoint, release,
                         remove_stale, save_atomic, write_atomic, write_text_atomic)
from ..input_rules import input_rules
from ..errors import ConfigError, TrainingError
from .config import TrainConfig, first_difference, resumed_config
from .data import CropDataset, DataError, channel_stats, check_crop, class_shares, load_split
from .device_data import DeviceCrops, fits_on_device
from .image_files import common_pixel_nm
from .init_weights import init_from, read_init
from .metrics import confusion, scores

__all__ = ["TrainConfig", "Trainer", "TrainingError", "evaluate", "resolve_device"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PLOT_EVERY_S = 30.0  # curves.png is redrawn at most this often (and after the last epoch)


CPU_UNITS = {  # precision: (the units that compute it natively, torch.cpu's probes for them)
    "bf16": ("AVX-512 BF16 or AMX", ("_is_avx512_bf16_supported", "_is_amx_tile_supported")),
    "fp16": ("AMX-FP16", ("_is_amx_fp16_supported",))}


def missing_cpu_units(device: torch.device, precision: str) -> str | None:
    """The CPU units that ``precision`` autocast lacks on ``device`` (then it is emulated,
    slower than fp32), e.g. 'AVX-512 BF16 or AMX'; None on a GPU, in fp32, or when present."""
    if device.type != "cpu" or precision not in CPU_UNITS:
        return None
    units, checks = CPU_UNITS[precision]
    probes = [getattr(torch.cpu, name, None) for name in checks]
    return units if all(probe is not None and not probe() for probe in probes) else None


def emulation_note(device: torch.device | str, precision: str,
                   advice: str = "--precision fp32 is faster here") -> str | None:
    """A one-line note when ``precision`` autocast ('auto' resolved for ``device``, which may
    be 'auto' too) is emulated on this CPU (missing_cpu_units)."""
    device = resolve_device(device) if isinstance(device, str) else device
    precision = resolve_precision(precision, device)
    missing = missing_cpu_units(device, precision)
    return (f"note: this CPU has no {missing}, so {precision} autocast is emulated: "
            f"{advice}") if missing else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 on CUDA, fp32 elsewhere; other values as given."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def make_criterion(name: str, weights: torch.Tensor | None):
    """ce | focal+iou | dice+ce, from smp's losses; (logits (N,C,H,W), target (N,H,W)) → scalar."""
    import segmentation_models_pytorch as smp

    ce = nn.CrossEntropyLoss(weight=weights)
    if name == "ce":
        return ce
    if name == "focal+iou":
        focal, iou = smp.losses.FocalLoss("multiclass"), smp.losses.JaccardLoss("multiclass")
        return lambda logits, y: focal(logits, y) + iou(logits, y)
    dice = smp.losses.DiceLoss("multiclass")
    return lambda logits, y: dice(logits, y) + ce(logits, y)


def median_frequency_weights(shares: np.ndarray) -> torch.Tensor:
    """w_c = median(freq) / freq_c (classes absent from training get weight 0)."""
    present = shares[shares > 0]
    w = np.where(shares > 0, np.median(present) / np.maximum(shares, 1e-12), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def resolve_device(name) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cpu' / 'cuda' / 'cuda:0' (or such a
    torch.device) checked (ConfigError ``device`` otherwise: another GPU is chosen with
    CUDA_VISIBLE_DEVICES)."""
    value = str(name) if isinstance(name, torch.device) else name
    value = "cuda" if value == "cuda:0" else value
    if value not in ("auto", "cpu", "cuda"):
        hint = " (choose the GPU with CUDA_VISIBLE_DEVICES)" if str(value).startswith(
            "cuda:") else ""
        raise ConfigError("device", name, f"expected auto, cpu or cuda{hint}")
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is available (use cpu or auto)")
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(value)


@torch.no_grad()
def evaluate(model: nn.Module, batches, classes: int, device, autocast=None) -> torch.Tensor:
    """Confusion matrix (on the CPU) over every pixel the (x, y) batches yield, in eval mode;
    counted on ``device``, with one transfer at the end."""
    model.eval()
    total = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    for x, y in batches:
        with autocast or torch.autocast(torch.device(device).type, enabled=False):
            logits = model(x.to(device, non_blocking=True))
        total += confusion(logits.argmax(1), y.to(device, non_blocking=True), classes)
    return total.cpu()


def versions() -> dict:
    import segmentation_models_pytorch as smp
    import timm

    from .. import __version__
    return {"cellseg": __version__, "torch": str(torch.__version__), "smp": str(smp.__version__),
            "timm": str(timm.__version__), "python": platform.python_version()}


@contextlib.contextmanager
def compile_errors(cfg: TrainConfig):
    """Under ``--compile``, a model that torch.compile cannot trace or compile stops training
    in one line (TrainingError) instead of a compiler traceback."""
    if not cfg.compile:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError

    try:
        yield
    except (TorchDynamoException, CppCompileError) as e:
        cause = getattr(e, "inner_exception", None) or e  # a backend's own error
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        raise TrainingError(f"--compile: {cfg.spec!r} does not compile ({type(cause).__name__}"
                            f": {first[:200]}); train it without --compile") from None


def check_model_crop(model: nn.Module, crop: int) -> None:
    """ConfigError where ``model`` does not take ``crop``² inputs; PluginConfigError (from
    :func:`input_rules`) where it runs on no size at all."""
    rules = input_rules(model)
    try:
        rules.check(crop, f"--crop {crop}")
    except ValueError as e:
        raise ConfigError("crop", crop, str(e).split(": ", 1)[1]) from None


def seen_by_init(init: dict | None, cfg: TrainConfig, test: list[int]) -> list[int]:
    """The images of this run's test split that the ``--init`` checkpoint ``init`` trained or
    validated on: where it learnt from the same data (data, classes, class map), its train
    and val splits. None (weights from elsewhere): none known."""
    if init is None or first_difference(cfg, init.get("config", {}),
                                        ("data", "classes", "class_map")):
        return []
    split = init.get("split", {})
    return sorted(set(test) & set(split.get("train", []) + split.get("val", [])))


def init_warning(trainer) -> str | None:
    """A line where the --init checkpoint saw this run's test images; else None."""
    if not trainer.init_saw:
        return None
    return (f"warning: --init {trainer.cfg.init} learnt from {len(trainer.init_saw)} of this "
            f"run's {len(trainer.split['test'])} test images (the same data, another fold): "
            "its test scores are not held out")


class Trainer:
    """Builds data, model and optimiser from a TrainConfig and runs (or resumes) training.

    GPU-first: on CUDA the splits are held on the device when they fit (``data_on_device``)
    and cut into augmented batches there, training runs under bf16 autocast and cuDNN
    autotuning; on every device in channels-last memory format (oneDNN's convolutions are
    faster in it on CPUs too; each switchable in the config); losses stay on the device until
    the epoch ends. Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
    DistributedDataParallel, the training crops are sharded per rank, validation confusion
    matrices are all-reduced, and only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, given: set[str] | None = None):
        """``resume`` continues the run in ``cfg.out`` with the options it was trained with
        (:func:`resumed_config`: those not in ``given`` are taken from its last.pt)."""
        cfg.check()
        self.out = Path(cfg.out)
        self.lock = None  # cfg.out's lock: held by run() while it writes there
        if self.out.is_dir() and distributed.is_main():
            release(hold_folder(self.out))  # refused now, before any work, if another has it
        if not resume and (self.out / "last.pt").exists():
            raise DataError(f"--out {str(self.out)!r} already holds a run; use --resume or "
                            "another --out")
        if resume and not (self.out / "last.pt").exists():
            raise DataError(f"--resume: no last.pt in {str(self.out)!r}")
        last = load_checkpoint(self.out / "last.pt") if resume else None
        if last is not None:
            cfg = resumed_config(cfg, last["config"], given)
        init = None
        if cfg.init and last is None:
            try:
                init = read_init(cfg.init)
            except DataError as e:
                raise DataError(f"--init: {e}") from None
        self.cfg = cfg
        self.device = distributed.setup(resolve_device(cfg.device))
        cuda = self.device.type == "cuda"
        self.sources, self.split = load_split(cfg)
        check_crop(self.sources, sum(self.split.values(), []), cfg.crop)  # the test split too
        self.mean, self.std = channel_stats(self.sources, self.split["train"])
        self.pixel_nm = cfg.pixel_size or common_pixel_nm(  # predict compares its inputs'
            [self.sources.pixel_sizes[i] for i in self.split["train"]])
        self.class_names = self.sources.class_names
        self.init_saw = seen_by_init(init.checkpoint, cfg, self.split["test"]) if init else []
        n = len(self.class_names)
        self.train_set = CropDataset(self.sources, self.split["train"], cfg.crop, self.mean,
                                     self.std, augment=cfg.augment, seed=cfg.seed)
        self.val_set = CropDataset(self.sources, self.split["val"], cfg.crop, self.mean, self.std,
                                   count_once=True)
        self.on_device = self._data_on_device()
        if self.on_device:
            self.train_crops = DeviceCrops(self.train_set, self.device)
            self.val_crops = DeviceCrops(self.val_set, self.device)
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.spec, in_channels=self.sources.in_channels, classes=n)
        # fine-tuning: the tensors --init's checkpoint has for this model; the others fresh
        self.fresh, self.init_summed = (init_from(self.model, init, cfg.init) if init
                                        else (None, []))
        self.model = self.model.to(self.device)
        check_model_crop(self.model, cfg.crop)
        self.channels_last = True if cfg.channels_last is None else cfg.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cuda:
            torch.backends.cudnn.benchmark = (True if cfg.cudnn_benchmark is None
                                              else cfg.cudnn_benchmark)
        self.precision = resolve_precision(cfg.precision, self.device)
        if distributed.world_size() > 1 and cfg.sync_bn is not False:
            self.model = distributed.sync_batchnorm(self.model, self.device)
        self.net = (torch.compile(self.model, mode=cfg.compile_mode) if cfg.compile
                    else self.model)
        if distributed.world_size() > 1:
            unused = distributed.unused_parameters(self.model, self.sources.in_channels, n,
                                                   input_rules(self.model).fit(cfg.crop))
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=bool(unused))
        params = self.model.parameters()
        self.optimizer = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
                          else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9))
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs)
                          if cfg.schedule == "cosine" else None)
        weights = (median_frequency_weights(class_shares(self.sources, self.split["train"]))
                   if cfg.class_weights == "auto" else None)
        self.criterion = make_criterion(cfg.loss, None if weights is None else weights.to(self.device))
        self.checkpoint_every = (cfg.checkpoint_every if cfg.checkpoint_every is not None
                                 else 60.0 if cuda else 0.0)
        self._saved, self._best_unsaved = time.monotonic(), None
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16" and cuda)
        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []
        self._plotted = 0.0
        if last is not None:
            self._restore(last)

    def _data_on_device(self) -> bool:
        """--data-on-device as given; else the loader when --workers asks for it, else on the
        device when the splits fit (fits_on_device)."""
        if self.cfg.data_on_device is not None:
            return self.cfg.data_on_device
        if self.cfg.workers:
            return False
        return fits_on_device(len(self.train_set) + len(self.val_set), self.cfg.crop,
                              self.sources.in_channels, self.device)

    def autocast(self):
        """The autocast context of the configured precision (disabled for fp32)."""
        return torch.autocast(self.device.type, dtype=DTYPES.get(self.precision),
                              enabled=self.precision in DTYPES)

    def _restore(self, ckpt: dict) -> None:
        if ckpt["spec"] != self.cfg.spec:
            raise DataError(f"--resume: last.pt holds {ckpt['spec']!r}, not {self.cfg.spec!r}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best, self.history = ckpt["best_miou"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"]["torch"])

    def checkpoint(self) -> dict:
        return {
            "format": FORMAT, "spec": self.cfg.spec, "in_channels": self.sources.in_channels,
            "class_names": list(self.class_names), "norm": {"mean": self.mean, "std": self.std},
            "pixel_nm": self.pixel_nm,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch, "step": self.step, "best_miou": self.best,
            "history": self.history, "rng": {"torch": torch.get_rng_state()},
            "config": asdict(self.cfg), "split": self.split, "versions": versions(),
        }

    def loader(self, dataset, shuffle: bool, seed: int = 0):
        if distributed.world_size() > 1 and shuffle:
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
            return torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size,
                                               sampler=sampler, num_workers=self.cfg.workers)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.cfg.batch_size, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda")

    def train_batches(self, epoch_seed: int):
        """(number of batches, iterator of (x, y) on the device) for this epoch."""
        world, rank = distributed.world_size(), distributed.rank()
        if self.on_device:
            n = len(range(rank, len(self.train_crops), world))
            return -(-n // self.cfg.batch_size), self.train_crops.batches(
                self.cfg.batch_size, self.epoch, shuffle=True, rank=rank, world=world)
        self.train_set.epoch = self.epoch
        loader = self.loader(self.train_set, shuffle=True, seed=epoch_seed)
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(self.epoch)
        return len(loader), ((x.to(self.device, non_blocking=True),
                              y.to(self.device, non_blocking=True)) for x, y in loader)

    def validate(self) -> dict:
        """Scores on the validation split; each rank takes every world-th crop, then all-reduce."""
        world, rank = distributed.world_size(), distributed.rank()
        if self.on_device:
            batches = self.val_crops.batches(self.cfg.batch_size, rank=rank, world=world)
        else:
            shard = torch.utils.data.Subset(self.val_set, range(rank, len(self.val_set), world))
            batches = self.loader(shard, shuffle=False)
        matrix = evaluate(self.model, self._channels_last(batches), len(self.class_names),
                          self.device, self.autocast())
        return scores(distributed.all_reduce_sum(matrix.to(self.device)).cpu(), self.class_names)

    def _channels_last(self, batches):
        for x, y in batches:
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y

    def hold_out(self) -> None:
        """Lock cfg.out (rank 0 only; a second process training into it is refused in one line
        instead of both writing the same files), then remove what a killed run half-wrote."""
        if self.lock is None and distributed.is_main():
            self.lock = hold_folder(self.out)
            remove_stale(self.out)

    def write_config(self) -> None:
        if not distributed.is_main():
            return
        self.hold_out()
        info = {**asdict(self.cfg), "versions": versions(), "split": self.split,
                "class_names": list(self.class_names), "norm": {"mean": self.mean, "std": self.std},
                "pixel_nm": self.pixel_nm,
                "resolved": {"device": str(self.device), "precision": self.precision,
                             "channels_last": self.channels_last, "data_on_device": self.on_device,
                             "threads": torch.get_num_threads()}}  # what 'auto' / None became
        write_text_atomic(self.out / "config.json", json.dumps(info, indent=2))

    def train_epoch(self, on_step=None) -> float:
        """One epoch; returns the mean loss. ``on_step(i, n, loss)`` gets the loss as a device
        tensor (reading it is the caller's choice: it waits for the device)."""
        cfg, model = self.cfg, self.net
        epoch_seed = cfg.seed * 100_003 + self.epoch
        torch.manual_seed(epoch_seed)  # dropout, FREM draws: a function of (seed, epoch)
        plugins = plugin_modules(self.model)  # listed once, not walked every step
        epoch_start(plugins, self.epoch)
        model.train()
        losses = []
        n, batches = self.train_batches(epoch_seed)
        for i, (x, y) in enumerate(self._channels_last(batches)):
            step_start(plugins, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            with compile_errors(cfg):
                if cfg.compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    loss = training_loss(model, x, y, lambda a, b: self.criterion(a.float(), b),
                                         plugins)
                self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            losses.append(loss.detach())
            if on_step:
                on_step(i + 1, n, losses[-1])
        losses = torch.stack(losses)
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()  # one sync per epoch
        if bad:
            raise TrainingError(
                f"loss became {float(losses[bad[0]])} at epoch {self.epoch + 1}, step "
                f"{bad[0] + 1}; stopped; last good checkpoint: {self.out / 'last.pt'} "
                "(try a lower --lr or --loss ce)")
        if self.scheduler is not None:
            self.scheduler.step()
        return float(losses.mean())

    def run(self, on_step=None, on_epoch=None) -> dict:
        """Train until cfg.epochs; returns the last history row. Releases cfg.out's lock."""
        try:
            return self._run(on_step, on_epoch)
        finally:
            release(self.lock)
            self.lock = None

    def _run(self, on_step, on_epoch) -> dict:
        self.write_config()
        while self.epoch < self.cfg.epochs:
            t0 = time.perf_counter()
            loss = self.train_epoch(on_step)
            loss = float(distributed.all_reduce_sum(
                torch.tensor([loss], device=self.device))) / distributed.world_size()
            val = self.validate()
            row = {"epoch": self.epoch + 1, "train_loss": loss, "val_miou": val["miou"],
                   "val_pixel_accuracy": val["pixel_accuracy"],
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0,
                   **{f"val_iou_{k}": v for k, v in val["iou"].items()}}
            self.history.append(row)
            self.epoch += 1
            improved = val["miou"] > self.best
            if improved:
                self.best = val["miou"]
            if distributed.is_main():
                self.save(improved)
            distributed.barrier()
            if on_epoch:
                on_epoch(row)
        return self.history[-1] if self.history else {}

    @contextlib.contextmanager
    def paused(self):
        """Time spent in the block does not count towards the checkpoint and curve intervals
        (``cellseg bench --epoch`` runs its bare epochs there)."""
        start = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - start
            self._saved += spent
            self._plotted += spent

    def save(self, improved: bool) -> None:
        """best.pt (if improved) and last.pt when ``checkpoint_every`` seconds have passed
        since the last write, and after the last epoch (until then the best epoch's checkpoint
        is a copy in memory: on CUDA a paper's U-Net checkpoint with its Adam state is 0.4 GB,
        more time than its epoch); metrics.csv every epoch. Each file is written atomically,
        so a kill or a full disk leaves the last good files. A failed write stops training in
        one line."""
        final = self.epoch == self.cfg.epochs
        due = final or time.monotonic() - self._saved >= self.checkpoint_every
        ckpt = self.checkpoint() if improved or due else None
        if improved:
            self._best_unsaved = ckpt if due else copy.deepcopy(ckpt)
        try:
            if due:
                if self._best_unsaved is not None:
                    save_atomic(self._best_unsaved, self.out / "best.pt")
                    self._best_unsaved = None
                save_atomic(ckpt, self.out / "last.pt")
                self._saved = time.monotonic()
            self.write_metrics(final=final)
        except OSError as e:
            raise TrainingError(f"could not write the epoch {self.epoch} files in "
                                f"{str(self.out)!r} ({e.strerror or e}); the previous ones are "
                                "intact: free space, then --resume") from None

    def write_metrics(self, final: bool = True) -> None:
        """metrics.csv every epoch; curves.png after the last epoch and at most every
        :data:`PLOT_EVERY_S` seconds before (drawing it costs as much as a small epoch)."""
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
                writer.writeheader()
                writer.writerows(self.history)

        write_atomic(self.out / "metrics.csv", write)
        if final or time.monotonic() - self._plotted >= PLOT_EVERY_S:
            plot_curves(self.history, self.out / "curves.png")
            self._plotted = time.monotonic()


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in history], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    b.plot(epochs, [r["val_miou"] for r in history], marker="o", color="tab:green")
    b.set(xlabel="epoch", ylabel="validation mIoU", title="validation mIoU", ylim=(0, 1))
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
