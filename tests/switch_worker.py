"""A worker process for tests/test_client.py: join a job, all-reduce, check exact sums, report.

Usage: python tests/switch_worker.py ADDRESS JOB WORLD_SIZE RANK MODE [SEED]
Modes:
  sizes  all-reduce the lengths 0, 1, k-1, k, k+1, s*k, 3*s*k+5 of values all over the int32 range
  many   120 small all-reduces of random lengths (for lossy switches)
  loop   all-reduce forever (until the job fails: for kill tests)
The last stdout line is one JSON object: {"ok": true, "stats": {...}} or {"ok": false, "error":
TYPE, "message": ..., "elapsed": seconds from the failure's call to the raise}. Each rank derives
every rank's input from (seed, rank, call), so it checks the sum by itself.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from switchagg import ClientConfig, SwitchClient, SwitchError

K, SLOTS, BURST = 64, 64, 16
CONFIG = ClientConfig(k=K, slots=SLOTS, burst=BURST, join_timeout=20, op_timeout=20,
                      rto_initial=0.02, rto_min=0.005, rto_max=0.03)


def make_input(seed: int, rank: int, call: int, numel: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rank, call])
    return rng.integers(-2**31, 2**31, numel, dtype=np.int64).astype(np.int32)


def expected_sum(seed: int, world: int, call: int, numel: int) -> np.ndarray:
    total = np.zeros(numel, np.int64)
    for r in range(world):
        total += make_input(seed, r, call, numel)
    return total.astype(np.int32)  # the low 32 bits: two's-complement wrap-around


def main() -> None:
    address, job, world, rank, mode = sys.argv[1:6]
    world, rank = int(world), int(rank)
    seed = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    if mode == "sizes":
        lengths = [0, 1, K - 1, K, K + 1, SLOTS * K, 3 * SLOTS * K + 5]
    elif mode == "many":
        lengths = np.random.default_rng(seed).integers(0, 4 * K, 120).tolist()
    else:
        lengths = [SLOTS * K * 8] * 1_000_000
    started = time.monotonic()
    try:
        with SwitchClient(address, job, world, rank, config=CONFIG) as client:
            print(json.dumps({"joined": client.rank}), flush=True)
            for call, numel in enumerate(lengths):
                started = time.monotonic()
                x = make_input(seed, rank, call, numel)
                before = x.copy()
                y = client.allreduce(x)
                if mode != "loop" and not np.array_equal(y, expected_sum(seed, world, call, numel)):
                    raise AssertionError(f"call {call}: wrong sum for {numel} values")
                if not np.array_equal(x, before):
                    raise AssertionError(f"call {call}: the input was modified")
            stats = client.stats().as_dict()
    except SwitchError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc),
                          "elapsed": time.monotonic() - started}), flush=True)
        sys.exit(3)
    print(json.dumps({"ok": True, "stats": stats}), flush=True)


if __name__ == "__main__":
    main()
