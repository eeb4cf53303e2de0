"""Compile every numba kernel of a worker ahead of time (`switchagg warmup`), once per machine.

What it owns: the list of compiled code a worker uses (the CPU quantize kernels, serial and
parallel, and the switch client's stream kernels) and loading it all in one call, each part
through `switchagg._compile.compile_once` (a file lock: processes that start together compile
once, the others load). What it must never do: run on import, or touch a GPU.

How it works: `warm_up()` calls each part's own warm-up with the argument types used at run time,
so numba's on-disk cache (the package's `__pycache__`, or NUMBA_CACHE_DIR) holds every kernel
afterwards; a later process loads them in well under a second. The docker images run it at build.
Nothing else needs it: a worker loads numba only at its first call large enough to use it
(`switchagg.kernels.NUMBA_MIN_ELEMENTS`), and a launcher (`switchagg compare`) calls
`warm_up_if_cold` while its workers start, so that a fresh install compiles once, visibly.
"""

from __future__ import annotations

import time

__all__ = ["warm_up", "warm_up_stream", "warm_up_if_cold"]


def warm_up_stream() -> float:
    """Load (or compile, once per machine) the switch client's stream kernels; returns seconds."""
    try:
        import numba
    except ImportError:  # the client falls back to numpy
        return 0.0
    from switchagg import _stream_jit
    from switchagg._compile import compile_once
    dispatchers = [v for v in vars(_stream_jit).values()
                   if isinstance(v, numba.core.registry.CPUDispatcher)]
    return compile_once("switch client's stream kernels", _stream_jit.warm_up, dispatchers)


def warm_up(parallel: bool = True, stream: bool = True) -> dict[str, float]:
    """Load (or compile once per machine) every kernel a worker uses; returns seconds per part.

    Args:
        parallel: also the multi-threaded quantize kernels (large gradients use them).
        stream: also the switch client's stream kernels.
    """
    from switchagg import kernels
    took = {}
    started = time.monotonic()
    kernels.warm_up(parallel=parallel)
    took["kernels"] = time.monotonic() - started
    if stream:
        took["stream"] = warm_up_stream()
    return took


def warm_up_if_cold(parallel: bool = False) -> bool:
    """Compile (visibly, under the compile lock) what `warm_up` would, only if the cache lacks
    some of it; a warm cache is left alone (each worker then loads only what it uses). Returns
    whether anything was cold. A launcher calls it while its workers start, so a fresh install
    compiles once, in the launcher's terminal, and the workers wait for it on the lock."""
    try:
        import numba
    except ImportError:
        return False
    from switchagg import _stream_jit
    from switchagg._compile import cold_dispatchers
    from switchagg.kernels import _numba
    stream = [v for v in vars(_stream_jit).values()
              if isinstance(v, numba.core.registry.CPUDispatcher)]
    if not cold_dispatchers(_numba.dispatchers(parallel) + stream):
        return False
    warm_up(parallel=parallel)
    return True
