"""torch.distributed glue: under ``torchrun`` (or :func:`launch`, ``cellseg train
--nproc-per-node``) training runs one process per device with DDP."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); pick the device."""
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@contextmanager
def _quiet(prefixes=("torch.distributed.elastic", "torch.distributed.launcher")):
    """torch elastic's own log lines (warnings of worker shutdown, an error per failed worker)
    silenced for the block: each process prints its own error, :func:`launch` the rest."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith(prefixes)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def launch(command: list[str], nproc: int) -> int:
    """``python -m cellseg_plugins.cli.main COMMAND`` in ``nproc`` processes on this machine,
    joined as ``torchrun --standalone --nproc-per-node NPROC`` joins them (a rendezvous on a
    free local port, no restarts, OMP_NUM_THREADS 1 unless set); returns the exit code of the
    first process that failed, 0 if none did. Each process prints its own one-line error; a
    process killed by a signal (the kernel's out-of-memory killer) is reported here on one
    line, without torchrun's traceback; Ctrl-C gives 130."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, max_restarts=0,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default: cores not oversubscribed
    with _quiet():
        try:
            elastic_launch(config, sys.executable)("-m", "cellseg_plugins.cli.main", *command)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            if failure.exitcode >= 0:
                return failure.exitcode
            print(f"error: training process {rank} of {nproc} was killed by "
                  f"{failure.signal_name()} (out of memory?), and the others stopped",
                  file=sys.stderr)
            return 1
        except SignalException:
            return 130
    return 0


def in_collective(error: BaseException) -> bool:
    """Whether ``error`` came out of torch.distributed (a collective or the store whose peer
    is gone: gloo's "Connection reset by peer", NCCL's abort), not out of the training's own
    code."""
    if isinstance(error, dist.DistError):
        return True
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = os.path.normpath(tb.tb_frame.f_code.co_filename) if tb else ""
    return os.path.normpath(os.path.dirname(dist.__file__)) + os.sep in where


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum of the ranks' gradients (every rank's loss
    depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class DistributedBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole distributed batch, on any device and backend (gloo too).

    torch's SyncBatchNorm takes GPU inputs only; this one all-reduces the per-channel sum,
    sum of squares and count (a differentiable all-reduce, so gradients flow across ranks)
    and normalises with the global statistics. (N, C, H, W) → same. Eval: running stats.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        local = torch.stack([x.double().sum(dims), (x.double() ** 2).sum(dims),
                             torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=torch.double,
                                        device=x.device)])
        total = _AllReduceSum.apply(local)
        count = total[2]
        mean = total[0] / count
        var = total[1] / count - mean ** 2
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) / torch.sqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm made global over the ranks: torch's SyncBatchNorm on CUDA, else
    :class:`DistributedBatchNorm`. Weights and running statistics are kept."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
                new = DistributedBatchNorm(child.num_features, child.eps, child.momentum,
                                           child.affine, child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new.to(child.weight.device if child.affine else device))
    return model


def unused_parameters(model: torch.nn.Module, in_channels: int, classes: int,
                      side: int) -> list[str]:
    """Names of the parameters a training step leaves without a gradient (on a copy of the
    model, one batch of zeros): DDP needs ``find_unused_parameters`` only if there are any."""
    import copy

    from ..registry import training_loss

    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    x = torch.randn(2, in_channels, side, side, device=device)
    y = torch.zeros(2, side, side, dtype=torch.long, device=device)
    training_loss(probe, x, y, lambda a, b: torch.nn.functional.cross_entropy(a.float(), b)
                  ).backward()
    return [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]
