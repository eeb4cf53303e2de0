"""The numba backend: fused, compiled CPU kernels, bit-identical to the numpy reference.

What it owns: one pass per kernel over memory (read float32, write int32), which is what makes
randomized rounding run near memcpy speed instead of the five passes and temporaries of numpy.

What it must never do: differ from `_numpy` by a single bit (tests compare them on random inputs),
import numba before a kernel is first used (a worker that never quantizes on CPU pays nothing), or
use fastmath (it would let LLVM fuse or reorder the float operations that fix the bits).

How it works: the same per-element rules as `_numpy` (read them there). Randomized rounding works
in tiles of 1024 Philox groups (4096 elements), aligned in global element index, one tile at a
time: (1) the tile's counters go into four word arrays and the ten rounds run over them
with the counters as the inner loop, which LLVM vectorizes (AVX2 vpmuludq); (2) the words are
interleaved into element order in an L1-resident buffer; (3) a branch-free loop (selects only, also
vectorized) scales, rounds and clips the tile, counting clipped elements; per-block scales are
first spread into a per-element tile buffer, so short blocks (k = 64) cost no extra calls.

Threads: calls below PARALLEL_MIN_ELEMENTS (per-packet and per-chunk calls) run the single-threaded
kernels, which release the GIL; larger quantize calls run `*_parallel` variants that share runs of
whole tiles out over numba's threads (NUMBA_NUM_THREADS, or numba.set_num_threads; at 1 thread
the serial kernel runs). Tile t covers the same global elements and Philox counters whichever thread
runs it, so the bits are the same as serial. Measured on the 2-core box (2 threads), randomized
rounding of 64 Ki elements took 138 us serial and 157 us parallel, of 256 Ki elements 574 us and
297 us, of 1 Mi elements 2.4 ms and 1.3 ms; per-packet calls (1024) took 8 us serial and 19 us
parallel. With the cores busy with other processes the parallel kernels ran no faster, or slower,
at every size, so the threshold sits at 1 Mi, where the gain is worth the risk; a process that
shares its cores with others (the workers of a local run) can set NUMBA_NUM_THREADS=1. Work items
are handed out dynamically (see _numba_impl), so a thread descheduled by another process does not
hold up a fixed half (numba's parallel chunk size is 1 during those calls). numba's omp threading
layer (GNU OpenMP here) is not fork safe: a process that ran a parallel kernel must start children
with spawn, as this project does. Dequantize stays serial: it already runs at memcpy speed.
Only one thread at a time runs a parallel kernel: another thread that asks meanwhile runs the
serial kernel (same bits), so threads that quantize side by side do not oversubscribe the cores
and no threading layer (workqueue is not thread safe) is ever entered twice.

The compiled functions live in `_numba_impl`, at module level so that numba's on-disk cache hits in
every process after the first (closures here missed it in every process); this module imports it on
the first kernel call (or `warm_up`) and only wraps it. Numba compiles each kernel on its own first
call, so a process pays only for what it uses. Inputs are passed as read-only views: numba
specializes on writability, and a read-only buffer (a ZeroMQ frame) would otherwise cost a second
compilation of the same kernel. The parallel variants compile in 15-20 s on a cold cache and load
in tens of milliseconds after; `warm_up(parallel=True)` loads them up front for a process that
will make large calls (a compile on the first such call would hold the GIL for seconds, silencing
the client's heartbeats). It is not the default: once run, their threads compete with torch's for
shared cores (the default digits comparison ran 4x slower per step with them loaded).
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["PARALLEL_MIN_ELEMENTS", "available", "warm_up", "dispatchers", "quantize", "dequantize",
           "block_max_abs", "int_squared_norm"]

_SQNORM_CHUNK = 1 << 30   # elements per exact partial sum (see the int64 bound in _numpy)
#: Elements from which quantize runs the multi-threaded kernels (crossover measured at 64-256 Ki on
#: idle cores, none on busy ones: see the essay).
PARALLEL_MIN_ELEMENTS = 1 << 20
_parallel_lock = threading.Lock()  # held while a parallel kernel runs (see the essay)


def available() -> bool:
    """Whether numba imports (the dispatcher falls back to numpy otherwise)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _impl():
    """The compiled kernels (imports numba and loads or compiles nothing yet: numba is lazy)."""
    from switchagg.kernels import _numba_impl
    return _numba_impl


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view of a (one numba specialization whatever the caller's buffer allows)."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def warm_up(parallel: bool = False) -> None:
    """Load (or, with a cold cache, compile) every kernel now, with the types the wrappers pass.

    Call it before timing or before a thread that must not stall (a client's engine thread) first
    quantizes: a compilation takes seconds, a cache load tens of milliseconds.

    Args:
        parallel: also load the multi-threaded quantize kernels that calls of PARALLEL_MIN_ELEMENTS
            or more use (otherwise they load, or compile, on the first such call).
    """
    x = np.zeros(8, np.float32)
    ints = np.zeros(8, np.int32)
    quantize(x, 1.0, 0, True, 0, 0, 0, 0, -1, 1, ints)
    quantize(x, 1.0, 0, False, 0, 0, 0, 0, -1, 1, ints)
    dequantize(ints, 1.0, 0, x, False)
    block_max_abs(x, 4)
    int_squared_norm(ints)
    if parallel:
        k = _impl()
        for per_block in (False, True):  # both specializations of the per_block flag
            scales = np.ones(8 if per_block else 1, np.float32)
            k.quantize_random_parallel(_ro(x), _ro(scales), per_block, 1, np.uint64(0), 0, 0, 0, -1, 1,
                                       ints)
            k.quantize_nearest_parallel(_ro(x), _ro(scales), per_block, 1, -1, 1, ints)


def dispatchers(parallel: bool = False) -> list:
    """The compiled functions `warm_up(parallel)` reaches (their cache files say cold or warm)."""
    import numba
    k = _impl()
    return [v for name, v in vars(k).items() if isinstance(v, numba.core.registry.CPUDispatcher)
            and (parallel or not name.endswith("_parallel"))]


def _as_array(values, dtype):
    """(per-value array, per_block flag) for a scalar or a per-block array."""
    if np.ndim(values) == 0:
        return np.full(1, values, dtype=dtype), False
    return np.ascontiguousarray(values, dtype=dtype), True


def quantize(x: np.ndarray, scale, block: int, random: bool, seed: int, rank: int, step: int,
             offset: int, lo: int, hi: int, out: np.ndarray) -> int:
    """Same contract as `_numpy.quantize`."""
    if x.size == 0:
        return 0
    k = _impl()
    scales, per_block = _as_array(scale, np.float32)
    block = int(block) if per_block else 1
    args = (_ro(x), _ro(scales), per_block, block)
    if random:
        args += (np.uint64(seed), int(rank), int(step), int(offset))
    args += (int(lo), int(hi), out)
    if x.size >= PARALLEL_MIN_ELEMENTS and _threads() > 1 and _parallel_lock.acquire(blocking=False):
        try:
            kernel = k.quantize_random_parallel if random else k.quantize_nearest_parallel
            # Dynamic scheduling, one work item at a time: on cores shared with other processes a
            # descheduled thread would otherwise hold up a fixed half of the work.
            with _numba_module().parallel_chunksize(1):
                return int(kernel(*args))
        finally:
            _parallel_lock.release()
    return int((k.quantize_random if random else k.quantize_nearest)(*args))


def _numba_module():
    import numba
    return numba


def _threads() -> int:
    """numba's thread count for this thread (NUMBA_NUM_THREADS, or numba.set_num_threads)."""
    return _numba_module().get_num_threads()


def dequantize(ints: np.ndarray, divisor, block: int, out: np.ndarray, accumulate: bool) -> None:
    """Same contract as `_numpy.dequantize`."""
    if ints.size:
        divisors, per_block = _as_array(divisor, np.float64)
        _impl().dequantize(_ro(ints), _ro(divisors), per_block, int(block) if per_block else 1, out,
                           bool(accumulate))


def block_max_abs(x: np.ndarray, block: int) -> np.ndarray:
    """Same contract as `_numpy.block_max_abs`."""
    out = np.zeros(-(-x.size // block), dtype=np.uint32)
    if x.size:
        _impl().max_abs_bits(_ro(x.view(np.uint32)), int(block), out)
    return out.view(np.float32)


def int_squared_norm(ints: np.ndarray) -> int:
    """Same contract as `_numpy.int_squared_norm`."""
    hi_sum, lo_sum = 0, 0
    ints = _ro(ints)
    for start in range(0, ints.size, _SQNORM_CHUNK):
        hi, lo = _impl().squared_norm_parts(ints[start:start + _SQNORM_CHUNK])
        hi_sum += int(hi)
        lo_sum += int(lo)
    return (hi_sum << 31) + lo_sum
