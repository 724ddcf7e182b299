"""Concurrent runs (engine/jobs.py): a run whose process dies fails alone."""

import os
import signal

import pytest

from cellseg_plugins.engine.jobs import run_jobs


def square_or_die(x: int) -> int:
    """A run: x², except for x == 1, whose process is killed as the OOM killer would, x == 3,
    which raises, and x == 4, whose process alone gets a Ctrl-C (SIGINT)."""
    if x == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 4:
        os.kill(os.getpid(), signal.SIGINT)
    if x == 3:
        raise ValueError("bad value 3")
    return x * x


@pytest.mark.slow
def test_a_killed_run_is_reported_with_its_call_and_the_others_finish():
    results = {args: (ok, value) for args, ok, value in
               run_jobs(square_or_die, [(0,), (1,), (2,), (3,), (4,)], jobs=2, threads=1)}
    assert results[(0,)] == (True, 0) and results[(2,)] == (True, 4)
    assert results[(3,)] == (False, "ValueError: bad value 3")
    ok, error = results[(1,)]
    assert not ok and error.startswith("its process was killed by SIGKILL (out of memory?"), error
    assert results[(4,)] == (False, "its process was stopped by Ctrl-C (SIGINT); the same "
                                    "command resumes it")


def test_one_job_runs_in_this_process_and_reports_an_exception():
    results = list(run_jobs(square_or_die, [(2,), (3,)], jobs=1))
    assert results == [((2,), True, 4), ((3,), False, "ValueError: bad value 3")]
