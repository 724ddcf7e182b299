"""``cellseg train``: a training run with Rich progress (engine.train.Trainer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..engine.config import TrainConfig
from . import options as o

console = Console(stderr=True)


@o.with_train_options()
def train_command(
    spec: o.Spec,
    cfg: TrainConfig,
    given: set[str],
    out: o.Out = "runs/latest",
    resume: Annotated[bool, typer.Option(
        help="continue the run in --out with the options it was trained with (--epochs may "
             "extend it)")] = False,
    nproc_per_node: Annotated[int, typer.Option(
        min=1, help="processes on this machine, one per GPU, training one model with "
                    "DistributedDataParallel (launched as torchrun --standalone launches "
                    "them; several machines: torchrun)")] = 1,
) -> None:
    """Train SPEC; writes best.pt, last.pt, metrics.csv, curves.png, config.json into --out."""
    from ..engine import distributed
    from ..engine.train import Trainer

    if nproc_per_node > 1:
        raise typer.Exit(_launch(cfg, nproc_per_node))
    trainer = Trainer(cfg, resume=resume, given=given)
    try:
        if distributed.is_main():
            _train_with_progress(trainer, trainer.cfg)
        else:
            trainer.run()
    except Exception as e:
        if distributed.world_size() > 1 and distributed.in_collective(e):
            from ..errors import TrainingError

            first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
            raise TrainingError(f"process {distributed.rank()} of {distributed.world_size()} "
                                "stopped: the processes lost touch (another one failed or "
                                f"was killed; {type(e).__name__}: {first})") from None
        raise
    finally:
        distributed.teardown()


def _launch(cfg: TrainConfig, nproc: int) -> int:
    """This command again in ``nproc`` processes (:func:`~..engine.distributed.launch`),
    without ``--nproc-per-node``; checked first, so that a bad value is one line rather than
    one a process: the options and spec, not under torchrun already, and on CUDA no more
    processes than GPUs. Returns the exit code."""
    import torch

    from ..engine import distributed
    from ..engine.train import resolve_device
    from ..errors import ConfigError

    cfg.check()  # the spec too
    if distributed.world_size() > 1:
        raise ConfigError("nproc_per_node", nproc, "this process is one of torchrun's "
                          "already: leave --nproc-per-node out")
    gpus = torch.cuda.device_count() if resolve_device(cfg.device).type == "cuda" else 0
    if gpus and nproc > gpus:
        raise ConfigError("nproc_per_node", nproc, f"this machine has {gpus} GPU(s): one "
                          "process each at most")
    words, command = iter(o.invocation()), []
    for word in words:
        if word == "--nproc-per-node":
            next(words, None)
        elif not word.startswith("--nproc-per-node="):
            command.append(word)
    return distributed.launch(command, nproc)


def init_note(path: str, model, fresh: list[str], summed: list[str]) -> str:
    """``fine-tuning from PATH: 40 of 42 tensors (fresh: segmentation_head.0.weight, …)``."""
    total = len(model.state_dict())
    notes = [f"{what}: " + ", ".join(names[:4])
             + (f" and {len(names) - 4} more" if len(names) > 4 else "")
             for what, names in (("fresh", fresh), ("summed over input channels", summed))
             if names]
    return (f"fine-tuning from {path}: {total - len(fresh)} of {total} tensors"
            + (f" ({'; '.join(notes)})" if notes else ""))


def _train_with_progress(trainer, cfg: TrainConfig) -> None:
    from ..engine import distributed
    from ..engine.image_files import mixed_pixel_sizes
    from ..engine.train import emulation_note, init_warning

    console.print(f"[bold]{cfg.spec}[/] on {cfg.data} fold {cfg.fold}/{cfg.folds}: "
                  f"{len(trainer.train_set)} train / {len(trainer.val_set)} val crops, "
                  f"device {trainer.device}, {distributed.world_size()} process(es)")
    if trainer.fresh is not None:
        console.print(init_note(cfg.init, trainer.model, trainer.fresh, trainer.init_summed),
                      soft_wrap=True, markup=False)
    warning = init_warning(trainer)
    if warning:
        console.print(warning, style="yellow", soft_wrap=True, markup=False)
    note = emulation_note(trainer.device, trainer.precision)
    if note:
        console.print(note)
    mixed = mixed_pixel_sizes([trainer.sources.pixel_sizes[i] for i in trainer.split["train"]])
    if mixed and not cfg.pixel_size:
        console.print(f"warning: {mixed}", style="yellow", soft_wrap=True, markup=False)
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=trainer.epoch,
                                        info="")
        steps_task = progress.add_task("steps", total=None, info="")

        shown = [0.0]

        def on_step(i, n, loss):  # reading the loss waits for the device: twice a second
            if time.monotonic() - shown[0] > 0.5 or i == n:
                shown[0] = time.monotonic()
                progress.update(steps_task, completed=i, total=n, info=f"loss {float(loss):.4f}")

        def on_epoch(row):
            progress.update(epochs_task, advance=1,
                            info=f"val mIoU {row['val_miou']:.4f} (best {trainer.best:.4f})")

        start = trainer.epoch
        trainer.run(on_step, on_epoch)
    if start >= cfg.epochs:  # a finished run given --resume: nothing was trained or written
        console.print(f"nothing to train: the run in {cfg.out!r} has finished {start} of "
                      f"{cfg.epochs} epoch(s) (a larger --epochs extends it); best validation "
                      f"mIoU {trainer.best:.4f} in {Path(cfg.out) / 'best.pt'}")
        return
    console.print(f"best validation mIoU {trainer.best:.4f}; wrote {Path(cfg.out) / 'best.pt'}")
