"""`switchagg bench` end to end on tiny setups: JSON schema, exact sums under loss, teardown.

No timing is asserted (figures vary with the machine and its load); the tests check that each
contender ran, verified its sums, reported sane figures, and that no child outlives the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import PYTHON
from switchagg.workers._bench_workers import _verify, bench_input, expected_sum
from switchagg.workers.bench import _median_round, call_latency

pytestmark = pytest.mark.slow

#: Small enough for a second or two per contender: 2 workers, ~40 packets per all-reduce over a
#: window of 4 bursts of 8 packets.
TINY = ["--workers", "2", "--numel", "2500", "--k", "64", "--slots", "32", "--burst", "8",
        "--repeats", "1", "--warmup", "1", "--timeout", "60"]
REQUIRED = {
    "ate_per_s": float, "gloo_ate_per_s": (float, type(None)),
    "zmq_ceiling_ate_per_s": (float, type(None)), "packets_per_s": float, "workers": int,
    "numel": int, "k": int, "slots": int, "drop": float, "burst": int, "repeats": int,
    "cores": int, "transport": str, "ate_vs_gloo": (float, type(None)),
    "ate_vs_zmq_ceiling": (float, type(None)), "goodput": float, "retransmitted": int,
    "call_s": dict,
}


def bench(spawn, *flags: str, timeout: float = 90) -> tuple[int, dict | None, str]:
    """Run `switchagg bench` in its own process group; (exit code, JSON or None, stderr)."""
    proc = spawn([PYTHON, "-m", "switchagg.workers.cli", "--log-level", "WARNING", "bench", *flags],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    # multiprocessing's resource tracker leaves on its own once it sees its parent's pipe close.
    deadline = time.monotonic() + 3
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"bench left children running: {left}"
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


def _group_members(pgid: int) -> list[str]:
    """Command lines of the live processes in process group `pgid` (spawn gives each its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:200])
            except OSError:
                pass
    return found


def check_schema(figures: dict, transport: str, gloo: bool, zmq: bool) -> None:
    for key, kind in REQUIRED.items():
        assert isinstance(figures.get(key), kind), (key, figures.get(key))
    assert figures["workers"] == 2 and figures["numel"] == 2500 and figures["k"] == 64
    assert figures["slots"] == 32 and figures["burst"] == 8 and figures["repeats"] == 1
    assert figures["transport"] == transport
    assert figures["ate_per_s"] > 0 and figures["packets_per_s"] > 0
    calls = figures["call_s"]
    assert calls["median"] <= calls["p90"] <= calls["p99"] <= calls["max"]
    assert calls["max"] == max(figures["rounds_s"]) and calls["max_over_median"] >= 1
    assert 0 < figures["goodput"] <= 64 * 4 / (16 + 64 * 4)  # payload / (header + payload)
    assert (figures["gloo_ate_per_s"] is not None) == gloo
    assert (figures["zmq_ceiling_ate_per_s"] is not None) == zmq
    if gloo:
        assert figures["ate_vs_gloo"] == pytest.approx(figures["ate_per_s"]
                                                       / figures["gloo_ate_per_s"])
    if zmq:
        assert figures["ate_vs_zmq_ceiling"] == pytest.approx(
            figures["ate_per_s"] / figures["zmq_ceiling_ate_per_s"])


@pytest.mark.timeout(120)
def test_bench_tcp_measures_all_three_contenders(spawn):
    code, figures, err = bench(spawn, *TINY, "--transport", "tcp", "--json")
    assert code == 0, err
    check_schema(figures, "tcp", gloo=True, zmq=True)
    assert figures["retransmitted"] == 0 and figures["drop"] == 0.0


@pytest.mark.timeout(120)
def test_bench_ipc_prints_the_table_or_json(spawn):
    code, figures, err = bench(spawn, *TINY, "--transport", "ipc", "--skip-gloo", "--json")
    assert code == 0, err
    check_schema(figures, "ipc", gloo=False, zmq=True)
    proc = spawn([PYTHON, "-m", "switchagg.workers.cli", "bench", *TINY, "--skip-gloo", "--skip-zmq"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "ATE/s" in out and "packets/s" in out and "ZeroMQ ceiling" not in out


@pytest.mark.timeout(120)
def test_bench_under_loss_still_verifies_exactly(spawn):
    # Every all-reduce is compared element by element with the exact sum inside the workers; a
    # mismatch would exit 1. Retransmissions prove the loss path ran.
    code, figures, err = bench(spawn, *TINY, "--repeats", "3", "--drop", "0.05", "--duplicate",
                               "0.05", "--reorder", "0.05", "--seed", "3", "--skip-gloo",
                               "--skip-zmq", "--json")
    assert code == 0, err
    assert figures["drop"] == 0.05 and figures["retransmitted"] > 0


@pytest.mark.timeout(60)
def test_bench_that_runs_out_of_time_fails_and_leaves_no_child(spawn):
    code, figures, err = bench(spawn, "--workers", "2", "--numel", "50000000", "--timeout", "2",
                               "--skip-gloo", "--skip-zmq", "--json")
    assert code == 1 and figures is None
    assert "not done within 2s" in err


@pytest.mark.timeout(60)
def test_bench_rejects_a_burst_larger_than_the_window(spawn):
    code, figures, err = bench(spawn, "--slots", "64", "--burst", "128", "--json")
    assert code == 2 and figures is None and "--burst" in err


def test_bench_inputs_span_int32_and_their_sum_wraps():
    x = [bench_input(r, 4096) for r in range(3)]
    assert x[0].min() < -2**30 and x[0].max() > 2**30 and not np.array_equal(x[0], x[1])
    exact = sum(v.astype(np.int64) for v in x)
    assert np.array_equal(expected_sum(3, 4096), exact.astype(np.int32))  # low 32 bits


def test_verify_rejects_a_wrong_sum():
    good = expected_sum(2, 100)
    _verify(good.copy(), good, "x")
    bad = good.copy()
    bad[37] += 1
    with pytest.raises(AssertionError, match="1 wrong elements, first at index 37"):
        _verify(bad, good, "x")
    with pytest.raises(AssertionError, match="shape"):
        _verify(good[:-1], good, "x")


def test_median_round_takes_each_rounds_slowest_worker():
    reports = [{"times": [1.0, 5.0, 2.0], "cpu": [0.5, 0.5, 0.5]},
               {"times": [3.0, 1.0, 2.5], "cpu": [0.25, 0.25, 0.25]}]
    median, rounds, cpu = _median_round(reports)
    assert rounds == [3.0, 5.0, 2.5] and median == 3.0 and cpu == 0.75


def test_call_latency_takes_nearest_rank_percentiles_of_the_rounds():
    rounds = [float(t) for t in range(100, 0, -1)]  # 1..100 s, unordered
    calls = call_latency(rounds)
    assert (calls["median"], calls["p90"], calls["p99"], calls["max"]) == (50.5, 90, 99, 100)
    assert calls["max_over_median"] == pytest.approx(100 / 50.5)
    few = call_latency([0.2, 0.1, 0.4])  # under 100 calls p99 is the slowest one
    assert (few["median"], few["p90"], few["p99"], few["max"]) == (0.2, 0.4, 0.4, 0.4)


@pytest.mark.timeout(60)
def test_bench_quantize_prints_the_kernels_figures(spawn):
    code, figures, err = bench(spawn, "--quantize", "--numel", "4096", "--repeats", "1", "--json")
    assert code == 0, err
    assert figures["device"] == "cpu" and figures["numel"] == 4096 and figures["copy_GBps"] > 0


def test_sweep_prints_a_row_per_point_and_writes_the_plot(spawn, tmp_path):
    """`--sweep` on loopback: one row per worker count, every contender measured, a PNG."""
    png = tmp_path / "sweep.png"
    proc = spawn([PYTHON, "-m", "switchagg.workers.cli", "--log-level", "WARNING", "bench", *TINY,
                  "--sweep", "--sweep-workers", "1,2", "--skip-gloo", "--json", "--plot",
                  str(png)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    points = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [p["workers"] for p in points] == [1, 2]
    assert all(p["network"] == "loopback (ipc)" and p["ate_per_s"] > 0
               and p["zmq_ceiling_ate_per_s"] > 0 and p["gloo_ate_per_s"] is None
               for p in points)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
