"""Concurrent runs: N processes at a time (``--jobs N``), each with its share of the CPU cores.

On one GPU the N processes share the device; on a CPU each gets cores / N threads (or
``threads``). A run's floating-point results depend on its thread count on a CPU (oneDNN
splits its reductions by thread), so runs are bit-identical across ``--jobs`` values when they
are given the same ``--threads``. A worker whose parent process is gone (killed by SIGTERM or
SIGKILL, which it cannot pass on) stops within a second, so no run trains on unseen into a
folder that a restarted command then resumes as well; on Ctrl-C the workers stop without a
traceback each. A worker that dies (SIGKILL from the OOM killer, a segfault) fails its own run
only: each run has a process of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait
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


def _child(parent: int, send, fn: Callable, args: tuple, threads: int | None) -> None:
    """One run in its own process: send (ok, result or one-line error) to the parent."""
    _worker_start(parent)
    send.send(_call(fn, args, threads))
    send.close()


def _death(exitcode: int | None) -> str:
    """Why a worker ended without a result: 'killed by SIGKILL (...)', 'stopped by Ctrl-C' or
    'exited with code N'. A worker stopped by SIGINT exits 130 (:func:`_worker_start`); its
    parent reports that itself where it sees the SIGINT too, not where it ignores it (started
    in the background by a shell)."""
    if exitcode == 130:
        return "its process was stopped by Ctrl-C (SIGINT); the same command resumes it"
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
        return f"its process was killed by {name}{hint}; the same command resumes it"
    return f"its process exited with code {exitcode} before reporting a result"


def run_jobs(fn: Callable, calls: list[tuple], jobs: int = 1,
             threads: int | None = None) -> Iterator[tuple[tuple, bool, object]]:
    """Run ``fn(*args)`` for every ``args`` in ``calls``, ``jobs`` at a time; yield
    (args, ok, result or one-line error) as each finishes. ``jobs=1`` runs in this process.

    With ``jobs > 1`` every call gets a fresh process of its own (spawned), so a process that
    dies (a segfault, or SIGKILL from the kernel when memory runs out) fails its own run only,
    which is reported as such, and the other runs go on; unlike a ``ProcessPoolExecutor``,
    whose one broken worker ends every run of the pool."""
    if jobs == 1:
        previous = torch.get_num_threads()
        try:
            for args in calls:
                yield (args, *_call(fn, args, threads))
        finally:
            torch.set_num_threads(previous)
        return
    per_job = job_threads(jobs, threads)
    context = multiprocessing.get_context("spawn")
    todo = list(calls)
    running = {}  # the receiving end of a run's pipe -> (its process, its args)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                args = todo.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_child,
                                          args=(os.getpid(), send, fn, args, per_job))
                process.start()
                send.close()  # the child's end now: EOF here once the child is gone
                running[receive] = (process, args)
            for receive in wait(list(running)):
                process, args = running.pop(receive)
                try:
                    ok, value = receive.recv()
                except EOFError:  # the process ended without sending its result
                    process.join()
                    ok, value = False, _death(process.exitcode)
                else:
                    process.join()
                receive.close()
                yield args, ok, value
    finally:  # an exception or Ctrl-C here, or the caller stopped iterating
        for receive, (process, _) in running.items():
            process.terminate()
            process.join()
            receive.close()
