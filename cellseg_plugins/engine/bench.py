"""Benchmark a model spec: train-step and eval-forward time and FLOPs, peak memory, parameters.

Each model runs in a fresh worker process (so that its peak RSS on CPU is its own); with a
second model the two workers take turns step by step, so that both see the same machine load
and their ratios hold on a noisy machine.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

WARMUP_STEPS = 2


@dataclass
class BenchConfig:
    size: int = 256
    batch: int = 4
    in_channels: int = 1
    classes: int = 5
    device: str = "cpu"
    steps: int = 10
    precision: str = "fp32"  # fp32, or bf16 / fp16 autocast (the engine's; loss in fp32)
    channels_last: bool = True  # the engine's memory format
    threads: int | None = None  # CPU threads of each worker (None: torch's default)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(spec: str, cfg: BenchConfig) -> None:
    """Serve 'train' / 'eval' / 'done' commands on stdin; answer one JSON line each."""
    from .. import create_model, plugin_modules, step_start, training_loss
    from .train import DTYPES

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    device = cfg.device
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = create_model(spec, in_channels=cfg.in_channels, classes=cfg.classes).to(
        device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.size, cfg.size, device=device).contiguous(
        memory_format=layout)
    y = torch.randint(0, cfg.classes, (cfg.batch, cfg.size, cfg.size), device=device)
    rss_start = _peak_rss()
    step, plugins = 0, plugin_modules(model)

    def autocast():
        return torch.autocast(device, dtype=DTYPES.get(cfg.precision),
                              enabled=cfg.precision in DTYPES)

    def train_step():
        nonlocal step
        model.train()
        step_start(plugins, step)
        step += 1
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = training_loss(model, x, y, lambda a, b: criterion(a.float(), b), plugins)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def eval_step():
        model.eval()
        with autocast():
            model(x)

    actions = {"train": train_step, "eval": eval_step}
    flops = {f"{name}_flops": count_flops(action) for name, action in actions.items()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _reply({"ready": True, "rss_start": rss_start, "torch_threads": torch.get_num_threads(),
            **flops})
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
            _reply({"peak_memory": peak})
            return
        _sync(device)
        t0 = time.perf_counter()
        actions[command]()
        _sync(device)
        _reply({"seconds": time.perf_counter() - t0})


def count_flops(action) -> int:
    """FLOPs of one call (torch's FlopCounterMode: convolutions, matmuls, attention; 2 per MAC).

    torch's counter knows the CUDA attention kernels but not the CPU flash kernel; the same
    formulas are added for it.
    """
    from torch.utils.flop_counter import (FlopCounterMode, sdpa_backward_flop_count,
                                          sdpa_flop_count)

    aten = torch.ops.aten
    cpu_flash = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_flash) as counter:
        action()
    return counter.get_total_flops()


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    """A benchmark worker process for one spec."""

    def __init__(self, spec: str, cfg: BenchConfig):
        args = json.dumps({"spec": spec, "cfg": cfg.__dict__})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cellseg_plugins.engine.bench", args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            raise RuntimeError(f"benchmark worker failed: {err[-1] if err else 'no output'}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask("done")
        self.proc.wait(timeout=60)
        return out


def summarise(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median": statistics.median(samples), "q25": q[0], "q75": q[2],
            "spread": q[2] - q[0], "n": len(samples)}


def run_bench(specs: list[str], cfg: BenchConfig, progress=None) -> list[dict]:
    """Benchmark each spec (canonical strings) in its own worker, steps interleaved."""
    from .. import create_model

    results = []
    for spec in specs:
        model = create_model(spec, in_channels=cfg.in_channels, classes=cfg.classes)
        results.append({"spec": spec, "params": sum(p.numel() for p in model.parameters()),
                        "trainable_params": sum(p.numel() for p in model.parameters()
                                                if p.requires_grad),
                        "train": [], "eval": []})
        del model
    workers = [Worker(spec, cfg) for spec in specs]
    try:
        for phase in ("train", "eval"):
            for i in range(WARMUP_STEPS + cfg.steps):
                for w, r in zip(workers, results):
                    seconds = w.ask(phase)["seconds"]
                    if i >= WARMUP_STEPS:
                        r[phase].append(seconds)
                if progress:
                    progress(phase, i + 1, WARMUP_STEPS + cfg.steps)
        for w, r in zip(workers, results):
            r["peak_memory"] = w.close()["peak_memory"]
            r.update({k: w.info[k] for k in ("rss_start", "torch_threads", "train_flops",
                                           "eval_flops")})
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    for r in results:
        r["train_time"] = summarise(r.pop("train"))
        r["eval_time"] = summarise(r.pop("eval"))
    return results


def report(results: list[dict], cfg: BenchConfig) -> dict:
    """One JSON-ready object: the first model, ``vs`` (second model) and their ratios."""
    out = {"device": cfg.device, "precision": cfg.precision,
           "channels_last": cfg.channels_last, "size": cfg.size,
           "batch": cfg.batch, "steps": cfg.steps, "in_channels": cfg.in_channels,
           "classes": cfg.classes, **results[0]}  # torch_threads: the workers'
    if len(results) > 1:
        a, b = results
        out["vs"] = b
        out["ratio"] = {
            "train_time": a["train_time"]["median"] / b["train_time"]["median"],
            "eval_time": a["eval_time"]["median"] / b["eval_time"]["median"],
            "peak_memory": a["peak_memory"] / b["peak_memory"],
            "params": a["params"] / b["params"],
            "train_flops": a["train_flops"] / b["train_flops"],
            "eval_flops": a["eval_flops"] / b["eval_flops"],
        }
    return out


if __name__ == "__main__":
    _args = json.loads(sys.argv[1])
    worker(_args["spec"], BenchConfig(**_args["cfg"]))
