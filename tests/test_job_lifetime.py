"""A job ends with its processes: the name is free again at once after a clean end, an exit
without close, a dropped DDP state, an uncaught exception or a SIGKILL; a live job's name says so.

The switch here waits 60 s before declaring a silent worker dead, and every poll below gives up
after 10 s: a job freed in time was freed by a LEAVE (jobs_done) or by the switch noticing the
closed connection (jobs_aborted, peers_gone), never by the liveness timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from switchagg import ClientConfig, JoinRejected, SwitchClient
from switchagg.protocol import Abort, Error, Join, JoinOk, Leave, Ready
from tests.conftest import PYTHON, REPO
from tests.test_switch_server import RawWorker, join_all

WORKER = os.path.join(REPO, "tests", "lifetime_worker.py")
#: Far beyond every poll: only a LEAVE or a noticed disconnect can free a job within them.
LIVENESS_S = 60.0
POLL_S = 10.0


@pytest.fixture
def switch(switch_thread):
    """A switch in a thread (liveness timeout LIVENESS_S); its endpoint."""
    return switch_thread(liveness_timeout=LIVENESS_S).endpoint


def run_worker(spawn, endpoint: str, job: str, mode: str, world: int = 2) -> subprocess.Popen:
    """Start tests/lifetime_worker.py and wait (bounded) for its "ready" line."""
    proc = spawn([PYTHON, WORKER, endpoint, job, mode, str(world)], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True, env={"SWITCHAGG_CPU_KERNELS": "numpy"})
    line = proc.stdout.readline()  # the worker's clients time out after 20 s: never forever
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def join_when_free(ctx, endpoint: str, job: str, within: float = POLL_S) -> float:
    """JOIN `job` (2 workers) until the switch admits it; returns the seconds that took.

    Raises:
        AssertionError: still refused after `within` seconds (with the switch's last answer).
    """
    start = time.monotonic()
    answer = None
    while time.monotonic() - start < within:
        worker = RawWorker(ctx, endpoint)
        try:
            worker.send(Join(job, 2, 8, 16, "", None))
            answer = worker.control()
            if isinstance(answer, JoinOk):
                worker.send(Leave(answer.job_id, answer.rank))
                return time.monotonic() - start
            assert isinstance(answer, Error) and answer.code == "job_full", answer
        finally:
            worker.sock.close(linger=100)
        time.sleep(0.05)
    raise AssertionError(f"job {job!r} still taken {within} s later: {answer}")


def counters(ctx, endpoint: str) -> dict:
    worker = RawWorker(ctx, endpoint)
    try:
        return worker.stats()
    finally:
        worker.sock.close(linger=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["close", "exit"])
def test_name_free_right_after_a_clean_end_or_an_exit_without_close(ctx, switch, spawn, mode):
    proc = run_worker(spawn, switch, "ddp", mode)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    stats = counters(ctx, switch)  # both LEAVEs are in: the job is done, nothing was aborted
    assert stats["jobs_done"] == 1 and stats["jobs_aborted"] == stats["jobs_active"] == 0, stats
    join_when_free(ctx, switch, "ddp", within=2.0)


@pytest.mark.slow
def test_uncaught_exception_leaves_with_a_reason_that_names_it(ctx, switch, spawn):
    third = RawWorker(ctx, switch)
    proc = spawn([PYTHON, WORKER, switch, "ddp", "raise", "3"], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True, env={"SWITCHAGG_CPU_KERNELS": "numpy"})
    third.join("ddp", 3, slots=16, rank=2)
    third.control(Ready, timeout=30)
    abort = third.control(Abort, timeout=30)
    proc.wait(timeout=30)
    assert "uncaught RuntimeError('the training step failed')" in abort.reason, abort
    join_when_free(ctx, switch, "ddp")


@pytest.mark.slow
def test_name_free_soon_after_a_sigkill(ctx, switch, spawn):
    proc = run_worker(spawn, switch, "ddp", "hang")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    took = join_when_free(ctx, switch, "ddp")
    stats = counters(ctx, switch)
    assert stats["jobs_aborted"] == 1 and stats["peers_gone"] >= 1, stats
    print(f"job name free {took:.2f} s after the SIGKILL")


@pytest.mark.slow
def test_dropped_ddp_state_leaves_while_its_process_lives(ctx, switch, spawn):
    proc = run_worker(spawn, switch, "ddp", "state")
    line = proc.stdout.readline()
    assert line.strip() == "dropped", (line, proc.stderr.read() if proc.poll() is not None else "")
    join_when_free(ctx, switch, "ddp")
    assert proc.poll() is None  # the process still runs: its finalizer left, not its exit
    stats = counters(ctx, switch)
    assert stats["jobs_done"] >= 1 and stats["jobs_aborted"] == 0, stats


def test_reusing_a_live_jobs_name_says_it_is_still_running(ctx, switch):
    workers = join_all(ctx, switch, "ddp", 2, slots=16)
    with pytest.raises(JoinRejected) as caught:
        SwitchClient(switch, "ddp", 2, config=ClientConfig(k=8, slots=16, burst=8,
                                                           join_timeout=5))
    text = str(caught.value)
    assert "job 'ddp' is still running with 2/2 workers" in text and "s ago from 127.0.0.1" in text
    assert "choose another job name" in text and caught.value.field == "job"
    for w in workers:
        w.sock.close(linger=0)
    join_when_free(ctx, switch, "ddp")  # both closed their connections: the job is gone


def test_last_member_disconnecting_frees_the_job_even_after_others_left(ctx, switch):
    a, b = join_all(ctx, switch, "ddp", 2, slots=16)
    a.send(Leave(a.job_id, a.rank))  # a finished; b is still served
    b.sock.close(linger=0)          # b dies without LEAVE
    join_when_free(ctx, switch, "ddp")
    stats = counters(ctx, switch)
    assert stats["jobs_aborted"] == 1 and stats["peers_gone"] == 1, stats
