"""SwitchClient against the real switch process: exact sums, loss, several jobs, failures, rejections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import PYTHON, REPO, free_port
from switchagg import (
    ClientConfig, JobAborted, JoinRejected, SwitchClient, SwitchTimeout,
)

pytestmark = pytest.mark.slow
WORKER = os.path.join(REPO, "tests", "switch_worker.py")
FAST = ClientConfig(k=8, slots=16, burst=4, join_timeout=10, op_timeout=10, rto_min=0.01)


def start_switch(spawn, *flags: str) -> str:
    address = f"tcp://127.0.0.1:{free_port()}"
    spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
           "--liveness-timeout", "1", "--heartbeat-interval", "0.2", *flags])
    return address


def start_workers(spawn, address: str, job: str, world: int, mode: str, seed: int = 0):
    return [spawn([PYTHON, WORKER, address, job, str(world), str(r), mode, str(seed)],
                  stdout=subprocess.PIPE, text=True) for r in range(world)]


def outcome(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"worker printed nothing (rc {proc.returncode})"
    return json.loads(lines[-1])


def wait_joined(procs, timeout: float = 15) -> None:
    for p in procs:
        line = ""
        deadline = time.monotonic() + timeout
        while '"joined"' not in line and time.monotonic() < deadline:
            line = p.stdout.readline()
        assert '"joined"' in line, "worker did not join"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 5])
def test_workers_get_exact_wrapping_sums_for_every_length(spawn, world):
    address = start_switch(spawn)
    procs = start_workers(spawn, address, "sizes", world, "sizes", seed=world)
    for p in procs:
        result = outcome(p, 40)
        assert result["ok"], result
        assert result["stats"]["calls_completed"] == 7


@pytest.mark.timeout(60)
def test_several_jobs_share_one_switch(spawn):
    address = start_switch(spawn)
    jobs = {name: start_workers(spawn, address, name, 3, "sizes", seed=i)
            for i, name in enumerate(["a", "b"])}
    for procs in jobs.values():
        assert all(outcome(p, 40)["ok"] for p in procs)


@pytest.mark.timeout(60)
def test_hundreds_of_allreduces_stay_exact_under_loss_duplication_and_reordering(spawn):
    address = start_switch(spawn, "--drop", "0.1", "--duplicate", "0.05", "--reorder", "0.1",
                           "--seed", "7")
    procs = start_workers(spawn, address, "lossy", 3, "many", seed=3)
    results = [outcome(p, 50) for p in procs]
    assert all(r["ok"] for r in results), results
    assert sum(r["stats"]["retransmitted"] for r in results) > 0
    assert sum(r["stats"]["duplicates_ignored"] for r in results) > 0


@pytest.mark.timeout(60)
def test_killed_worker_aborts_the_others_quickly_and_the_switch_serves_on(spawn):
    address = start_switch(spawn)
    procs = start_workers(spawn, address, "doomed", 3, "loop")
    wait_joined(procs)
    time.sleep(0.5)  # let data flow
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for p in (procs[0], procs[2]):
        result = outcome(p, 10)
        assert not result["ok"] and result["error"] in ("JobAborted", "SwitchTimeout"), result
        assert "doomed" in result["message"]
        assert time.monotonic() - killed_at < 5 + 1, result  # + process exit
    assert all(outcome(p, 40)["ok"] for p in start_workers(spawn, address, "after", 2, "sizes"))


@pytest.mark.timeout(60)
def test_killed_switch_gives_workers_a_clear_timeout(spawn):
    address = f"tcp://127.0.0.1:{free_port()}"
    switch = spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
                    "--liveness-timeout", "1", "--heartbeat-interval", "0.2"])
    procs = start_workers(spawn, address, "orphans", 2, "loop")
    wait_joined(procs)
    time.sleep(0.3)
    os.killpg(switch.pid, signal.SIGKILL)
    for p in procs:
        result = outcome(p, 10)
        assert result["error"] == "SwitchTimeout", result
        assert address in result["message"] and "still running" in result["message"]


# ---- in-process clients (one process, several threads) ------------------------------------


def join_in_thread(*args, **kwargs):
    box: dict = {}

    def run():
        try:
            box["client"] = SwitchClient(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.timeout(60)
def test_join_rejections_name_the_reason(spawn):
    address = start_switch(spawn)
    SwitchClient(address, "probe", 1, config=FAST).close()  # the switch is up
    thread, box = join_in_thread(address, "guarded", 2, 0, config=FAST, token="s3cret")
    time.sleep(0.3)  # rank 0 created the job (a JOIN takes milliseconds once the switch is up)
    cases = [(dict(world_size=2, token="wrong"), "token"),
             (dict(world_size=2, rank=0, token="s3cret"), "rank"),
             (dict(world_size=3, token="s3cret"), "world_size")]
    for kwargs, field in cases:
        world = kwargs.pop("world_size")
        with pytest.raises(JoinRejected) as info:
            SwitchClient(address, "guarded", world, config=FAST, **kwargs)
        assert info.value.field == field, str(info.value)
        assert "guarded" in str(info.value)
    with SwitchClient(address, "guarded", 2, 1, config=FAST, token="s3cret") as second:
        thread.join(10)
        with box["client"] as first:
            x = np.arange(100, dtype=np.int32)
            future = first.allreduce_async(x)
            np.testing.assert_array_equal(second.allreduce(x * 2), x * 3)
            np.testing.assert_array_equal(future.result(10), x * 3)
            assert (first.rank, second.rank, first.world_size) == (0, 1, 2)


@pytest.mark.timeout(30)
def test_no_switch_gives_a_timeout_that_says_what_to_run():
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(SwitchTimeout, match=r"no answer from switch at .* within 0.5s; is "
                                            r"`switch-emulator --bind"):
        SwitchClient(address, "lonely", 2, timeout=0.5)


@pytest.mark.timeout(30)
def test_missing_workers_are_counted_in_the_join_timeout(spawn):
    address = start_switch(spawn)
    SwitchClient(address, "probe", 1, config=FAST).close()  # the switch is up
    with pytest.raises(SwitchTimeout, match=r"only 1 of 3 workers joined job 'short'"):
        SwitchClient(address, "short", 3, config=FAST, timeout=1.0)


@pytest.mark.timeout(60)
def test_single_worker_job_streams_exponents_and_checks_its_input(spawn):
    address = start_switch(spawn)
    with SwitchClient(address, "solo", 1, config=FAST) as client:
        assert client.allreduce(np.zeros(0, np.int32)).shape == (0,)
        with pytest.raises(TypeError, match="int32"):
            client.allreduce(np.zeros(3, np.float32))
        with pytest.raises(TypeError, match="numpy"):
            client.allreduce([1, 2, 3])
        with pytest.raises(ValueError, match="1-D"):
            client.allreduce(np.zeros((2, 2), np.int32))
        fed = []

        def fill(first, stop, returned, values_out, exponents_out):
            fed.append(returned.copy())
            values_out[:] = np.arange(first, stop)[:, None]
            exponents_out[:] = np.arange(first, stop) % 7

        numel = 40 * 8 + 3
        sums, exps = client.allreduce_stream(numel, fill)
        np.testing.assert_array_equal(sums, np.repeat(np.arange(41), 8)[:numel])
        np.testing.assert_array_equal(exps, np.arange(41) % 7)
        np.testing.assert_array_equal(np.concatenate(fed)[16:], (np.arange(41) % 7)[:-16])
        stats = client.stats()
        assert stats.calls_completed == 2 and stats.srtt is not None
    with pytest.raises(JobAborted, match="closed"):
        client.allreduce(np.zeros(3, np.int32))


@pytest.mark.timeout(60)
def test_stuck_allreduce_names_the_missing_worker(spawn):
    address = start_switch(spawn, "--liveness-timeout", "30", "--heartbeat-interval", "0.2")
    cfg = ClientConfig(k=8, slots=16, burst=4, join_timeout=10, op_timeout=0.5, rto_min=0.01)
    thread, box = join_in_thread(address, "stuck", 2, 1, config=cfg)
    with SwitchClient(address, "stuck", 2, 0, config=cfg) as waiting:
        thread.join(10)
        with box["client"]:
            started = time.monotonic()
            with pytest.raises(SwitchTimeout) as info:
                waiting.allreduce(np.ones(50, np.int32))  # rank 1 never calls
            assert time.monotonic() - started < 3
            assert "misses worker(s) [1]" in str(info.value) and "slots [0," in str(info.value)


def test_config_validation_names_field_and_value():
    assert ClientConfig().validate() == ClientConfig()
    for kwargs, field in [(dict(k=48), "k"), (dict(slots=0), "slots"),
                          (dict(slots=8, burst=16), "burst"), (dict(op_timeout=0), "op_timeout"),
                          (dict(rto_min=3.0), "rto_min"), (dict(k=1024, burst=8192), "burst"),
                          (dict(burst=1024, window=512), "window"),
                          (dict(slots=64, burst=8, window=128), "window")]:
        with pytest.raises(ValueError, match=rf"ClientConfig\.{field}="):
            ClientConfig(**kwargs).validate()


def test_window_defaults_to_half_the_granted_slots_when_that_holds_two_bursts():
    assert ClientConfig().window_for(8192, 1024) == 4096
    assert ClientConfig().window_for(16, 4) == 8
    assert ClientConfig().window_for(16, 16) == 16       # half would not hold two bursts
    assert ClientConfig(window=8192).window_for(2048, 256) == 2048  # cut to the slots granted
    assert ClientConfig(window=8192, slots=16384).window_for(16384, 1024) == 8192


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
