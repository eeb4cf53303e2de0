"""The dataplane switch: pick the golden (per-packet) or the fast (vectorized) slot pool by name.

What it owns: the one name every dataplane is registered under, and the interface they all provide
(as pyzmq's `zmq/backend/select.py` writes down what every backend must export). The switch server
calls `make_dataplane(name, world_size, slots, k, lane_bits=b)` and never imports an implementation directly, so
the same tests and the same server run over both. What it must never do: hold state or rules of its
own. Run `python -m switch_emulator.dataplane --bench` to print packet-rate figures.

Every dataplane provides:
    __init__(world_size, slots, k, *, lane_bits=32); attributes world_size, slots, k, lane_bits,
        dtype (the job's packet_dtype(k, lane_bits)), counters (DataplaneCounters)
    receive(packets, worker) -> DataplaneOutput(multicast, unicast)
    is_complete(version, slot) -> bool
    missing_workers(version, slot) -> list[int]
and may provide
    receive_checked(packets, worker, job) -> (DataplaneOutput, bad counts): validate_burst's
        checks and receive() in one call (the fast dataplane's compiled pass)
    receive_split_checked(heads, vals, worker, job) -> (SplitOutput | DataplaneOutput, bad
        counts): the same for a split frame (header words, payloads), answered split
`warm_up(name)` readies a dataplane's compiled code before the switch serves anything.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from switch_emulator._dataplane import FastDataplane
from switch_emulator._dataplane import warm_up as _warm_up_fast
from switch_emulator._golden import DataplaneCounters, DataplaneOutput, GoldenDataplane
from switchagg.packet import DEFAULT_LANE_BITS, Kind, make_burst

__all__ = ["DATAPLANES", "DEFAULT_DATAPLANE", "make_dataplane", "warm_up", "DataplaneCounters",
           "DataplaneOutput", "GoldenDataplane", "FastDataplane"]

#: Dataplanes by name. "golden" is the plain reference; "fast" is what the switch runs by default.
DATAPLANES = {"golden": GoldenDataplane, "fast": FastDataplane}
DEFAULT_DATAPLANE = "fast"


def make_dataplane(name: str, world_size: int, slots: int, k: int, *,
                   lane_bits: int = DEFAULT_LANE_BITS):
    """Build one job's slot pool.

    Args:
        name: a key of `DATAPLANES` ("golden" or "fast").
        world_size: number of workers of the job.
        slots: pool size s.
        k: lanes per packet.
        lane_bits: the job's lane width, 8, 16 or 32 (the switch adds and wraps in it).

    Returns:
        A fresh dataplane with every slot empty.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        cls = DATAPLANES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataplane {name!r}; choose one of {sorted(DATAPLANES)}"
                         ) from None
    return cls(world_size, slots, k, lane_bits=lane_bits)


def warm_up(name: str) -> bool:
    """Load or compile the compiled code of dataplane `name` now (seconds with a cold cache).

    Returns:
        True if it runs compiled code ("fast" where numba imports), False otherwise.
    """
    return _warm_up_fast() if DATAPLANES.get(name) is FastDataplane else False


def bench(name: str, world_size: int, burst: int, k: int, slots: int, seconds: float,
          duplicates: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Time `receive()` alone on a self-clocked stream: every worker sends the same chunks in turn.

    Args:
        name: dataplane name.
        world_size, burst, k, slots: the job (bursts of `burst` packets; slots >= burst).
        seconds: how long to time (after an untimed pass over the whole pool; at least one round).
        duplicates: fraction of each burst sent again at its end (exercises the repeat path).
        seed: for the payloads and the duplicates.

    Returns:
        Figures from the median burst (robust to other processes sharing the cores): microseconds
        per burst, packets/s and worker elements/s into the switch, aggregated elements/s out of it
        (slots completed per burst, times k).
    """
    rng = np.random.default_rng(seed)
    dataplane = make_dataplane(name, world_size, slots, k)
    values = rng.integers(-1000, 1000, (burst, k), dtype=np.int32)
    times, sizes, elapsed, chunk = [], [], 0.0, 0
    # Steady state: the first pass over the pool pays its page faults (lazily zeroed pages),
    # untimed.
    warmup = -(-2 * slots // burst)
    while elapsed < seconds or not times or warmup > 0:
        chunks = np.arange(chunk, chunk + burst)
        chunk += burst
        slot, version = chunks % slots, (chunks // slots) % 2
        for w in range(world_size):
            pkts = make_burst(Kind.DATA, 0, w, slot, version, chunks, values)
            if duplicates:
                pkts = np.concatenate([pkts, pkts[rng.random(burst) < duplicates]])
            start = time.perf_counter()
            dataplane.receive(pkts, w)
            if warmup <= 0:
                times.append(time.perf_counter() - start)
                sizes.append(len(pkts))
                elapsed += times[-1]
        warmup -= 1
    per_burst = float(np.median(times))
    packets = float(np.mean(sizes))
    return {"us_per_burst": 1e6 * per_burst, "packets_per_s": packets / per_burst,
            "elements_in_per_s": packets * k / per_burst,
            "aggregated_elements_per_s": burst / world_size * k / per_burst}


def main(argv: list[str] | None = None) -> None:
    """`python -m switch_emulator.dataplane --bench`: print figures for both dataplanes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time receive() and print figures")
    parser.add_argument("--workers", type=int, default=4, help="world size n (default 4)")
    parser.add_argument("-k", type=int, default=64, help="int32 lanes per packet (default 64)")
    parser.add_argument("--slots", type=int, default=8192, help="pool size (default 8192)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per figure (default 1)")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return
    print(f"n={args.workers} k={args.k} slots={args.slots}")
    print(f"{'dataplane':<8} {'burst':>6} {'dup':>5} {'us/burst':>10} {'Mpkt/s':>8} "
          f"{'Melem/s in':>11} {'Melem/s agg':>12}")
    cases = [("fast", 1024, 0.0), ("fast", 4096, 0.0), ("fast", 1024, 0.01), ("fast", 4096, 0.01),
             ("golden", 1024, 0.0)]
    for name, burst, dup in cases:
        # The golden model needs minutes for a pass over 8192 slots: give it a pool of one burst.
        slots = max(args.slots, burst) if name == "fast" else burst
        seconds = args.seconds if name == "fast" else min(args.seconds, 0.2)
        f = bench(name, args.workers, burst, args.k, slots, seconds, dup)
        print(f"{name:<8} {burst:>6} {dup:>5.2f} {f['us_per_burst']:>10.1f} "
              f"{f['packets_per_s'] / 1e6:>8.2f} {f['elements_in_per_s'] / 1e6:>11.1f} "
              f"{f['aggregated_elements_per_s'] / 1e6:>12.1f}")


if __name__ == "__main__":
    main()
