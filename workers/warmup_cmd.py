"""`switchagg warmup`: compile every numba kernel now, so that no run waits for a compiler.

What it owns: the command; the list of kernels is `switchagg.warmup` (a worker's) and the switch's
dataplane (`switch_emulator.dataplane.warm_up`). What it must never do: start a switch or a worker.
Each part compiles once per machine (a file lock), so running it while a job starts is safe. The
docker images run it at build; on a fresh install, run it once before the first comparison.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["configure", "main"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `switchagg warmup`."""
    parser.add_argument("--no-parallel", action="store_true",
                        help="skip the multi-threaded quantize kernels (only large gradients use them)")
    parser.add_argument("--no-switch", action="store_true",
                        help="skip the switch's dataplane kernels (a worker-only machine)")


def main(args: argparse.Namespace) -> int:
    """Compile (or load) every kernel; prints what took how long; returns 0."""
    from switchagg.kernels import cpu_backend_name
    from switchagg.warmup import warm_up

    started = time.monotonic()
    took = warm_up(parallel=not args.no_parallel)
    if not args.no_switch:
        t0 = time.monotonic()
        from switch_emulator.dataplane import DEFAULT_DATAPLANE
        from switch_emulator.dataplane import warm_up as warm_switch
        warm_switch(DEFAULT_DATAPLANE)
        took["switch dataplane"] = time.monotonic() - t0
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items())
    print(f"switchagg warmup: kernels ready ({cpu_backend_name()} backend; {parts}; "
          f"{time.monotonic() - started:.1f} s in all)")
    return 0
