"""Every method gives the same numbers over LocalCollective, TorchCollective (gloo) and the switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import PYTHON, REPO, free_port

sys.path.insert(0, os.path.join(REPO, "tests"))
from scaling_worker import INT_METHODS, K, SLOTS, primitives, run_methods  # noqa: E402

from switchagg.collectives import LocalGroup  # noqa: E402

WORKER = os.path.join(REPO, "tests", "scaling_worker.py")
pytestmark = pytest.mark.slow


def local_results(world: int, methods: list[str]) -> list[dict]:
    return LocalGroup(world, k=K, slots=SLOTS, timeout=20).run(lambda c: run_methods(c, methods))


def run_workers(spawn, argv_for_rank, world: int, timeout: float) -> list[dict]:
    # The workers use the numpy kernels (no numba compile per process: seconds each on 2 cores);
    # the in-process reference uses the default backend, so this also checks they agree bit for bit.
    procs = [spawn(argv_for_rank(r), stdout=subprocess.PIPE, text=True,
                   env={"SWITCHAGG_CPU_KERNELS": "numpy"}) for r in range(world)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines and p.returncode == 0, f"worker failed (rc {p.returncode})"
        results.append(json.loads(lines[-1]))
    return results


def floats(hexes: list[str]) -> np.ndarray:
    return np.array([np.frombuffer(bytes.fromhex(h), np.float32) for h in hexes])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world", [2, 3])
def test_methods_identical_over_local_and_torch_gloo(spawn, world):
    address = f"tcp://127.0.0.1:{free_port()}"
    remote = run_workers(spawn, lambda r: [PYTHON, WORKER, "torch", address, str(world), str(r)],
                         world, 80)
    local = local_results(world, ["sgd", *INT_METHODS])
    for rank in range(world):
        for name in INT_METHODS:
            assert remote[rank][name] == local[rank][name], f"{name} differs on rank {rank}"
            assert remote[rank][name] == remote[0][name], f"{name}: ranks disagree"
        # fp32 sums may add in another order: equal to rounding, not bit for bit.
        np.testing.assert_allclose(floats(remote[rank]["sgd"]), floats(local[rank]["sgd"]),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("drop", ["0", "0.02"])
def test_integer_methods_identical_over_local_and_the_switch(spawn, drop):
    # With loss, retransmissions must not change a single bit (nor the exponent look-ahead).
    world = 3
    address = f"tcp://127.0.0.1:{free_port()}"
    spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
           "--drop", drop, "--seed", "3"])
    remote = run_workers(spawn, lambda r: [PYTHON, WORKER, "switch", address, str(world), str(r)],
                         world, 80)
    local = local_results(world, INT_METHODS)
    for rank in range(world):
        for name in INT_METHODS:
            assert remote[rank][name] == local[rank][name], f"{name} differs on rank {rank}"


def expected_primitives(world: int) -> list[dict]:
    return LocalGroup(world, k=K, slots=SLOTS, timeout=20).run(primitives)


def test_local_primitives_wrap_count_and_emulate_the_look_ahead():
    world = 3
    res = expected_primitives(world)
    exact = np.array([2**31 - 1, -2**31, 1, -1, 0, 2**30] * 7, np.int64) * world
    assert res[0]["sum_int"] == exact.astype(np.uint32).view(np.int32).tolist()
    assert res[0]["wraps"] == 6                                # every chunk holds a wrapping value
    assert res[0]["max_int8"] == [world - 129, 5 * (world - 1), -3]
    assert res[0]["encode_saw"] == res[0]["stream_max"]        # encode got the max, in order
    assert res[0]["sum_float"] == [0.25 * world * (world + 1) / 2] * 5
    assert res[1]["gather"] == [list(range(r + 1)) for r in range(world)]
    assert all(r["stream_sum"] == res[0]["stream_sum"] for r in res)


@pytest.mark.timeout(60)
def test_primitives_identical_over_torch_gloo(spawn):
    world = 3
    address = f"tcp://127.0.0.1:{free_port()}"
    remote = run_workers(spawn, lambda r: [PYTHON, WORKER, "torch", address, str(world), str(r),
                                           "primitives"], world, 50)
    assert remote == expected_primitives(world)


@pytest.mark.timeout(60)
def test_primitives_identical_over_the_switch(spawn):
    world = 3
    address = f"tcp://127.0.0.1:{free_port()}"
    spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING"])
    remote = run_workers(spawn, lambda r: [PYTHON, WORKER, "switch", address, str(world), str(r),
                                           "primitives"], world, 50)
    local = expected_primitives(world)
    for r, l in zip(remote, local):
        l.pop("sum_float"), l.pop("gather")
        assert r.pop("wraps") >= 1 and l.pop("wraps") == 6     # the switch flags per slot
        assert r == l
