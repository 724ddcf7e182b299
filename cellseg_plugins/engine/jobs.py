"""Concurrent runs: N processes at a time (``--jobs N``), each with its share of the CPU cores.

On one GPU the N processes share the device; on a CPU each gets cores / N threads (or
``threads``). A run's floating-point results depend on its thread count on a CPU (oneDNN
splits its reductions by thread), so runs are bit-identical across ``--jobs`` values when they
are given the same ``--threads``. A worker whose parent process is gone (killed by SIGTERM or
SIGKILL, which it cannot pass on) stops within a second, so no run trains on unseen into a
folder that a restarted command then resumes as well; on Ctrl-C the workers stop without a
traceback each.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterator

import torch


def job_threads(jobs: int, threads: int | None = None) -> int:
    """Threads per run: ``threads``, else the machine's cores split between the jobs."""
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def _worker_start(parent: int, interval: float = 1.0) -> None:
    """Worker initializer. Ctrl-C (SIGINT, which the terminal sends to every process of the
    command) ends the worker quietly, leaving the one-line report to the parent; and a daemon
    thread ends it (exit code 143, as for SIGTERM) once its parent ``parent`` is gone. Files
    are written atomically, so stopping at any moment leaves the last good ones, as a SIGKILL
    does."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(143)

    threading.Thread(target=watch, name="cellseg-exit-with-parent", daemon=True).start()


def _call(fn: Callable, args: tuple, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    try:
        return True, fn(*args)
    except Exception as e:  # reported with the run's identity; the other runs go on
        return False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def run_jobs(fn: Callable, calls: list[tuple], jobs: int = 1,
             threads: int | None = None) -> Iterator[tuple[tuple, bool, object]]:
    """Run ``fn(*args)`` for every ``args`` in ``calls``, ``jobs`` at a time; yield
    (args, ok, result or one-line error) as each finishes. ``jobs=1`` runs in this process."""
    if jobs == 1:
        previous = torch.get_num_threads()
        try:
            for args in calls:
                yield (args, *_call(fn, args, threads))
        finally:
            torch.set_num_threads(previous)
        return
    per_job = job_threads(jobs, threads)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_call, fn, args, per_job): args for args in calls}
        for future in as_completed(futures):
            yield (futures[future], *future.result())
