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
first spread into a per-element tile buffer, so short blocks (k = 64) cost no extra calls. The
kernels are single-threaded (parallel=True measured no better on 2 shared cores, see _numba_impl)
and release the GIL.

The compiled functions live in `_numba_impl`, at module level so that numba's on-disk cache hits in
every process after the first (closures here missed it in every process); this module imports it on
the first kernel call (or `warm_up`) and only wraps it. Numba compiles each kernel on its own first
call, so a process pays only for what it uses. Inputs are passed as read-only views: numba
specializes on writability, and a read-only buffer (a ZeroMQ frame) would otherwise cost a second
compilation of the same kernel.
"""

from __future__ import annotations

import numpy as np

__all__ = ["available", "warm_up", "quantize", "dequantize", "block_max_abs", "int_squared_norm"]

_SQNORM_CHUNK = 1 << 30   # elements per exact partial sum (see the int64 bound in _numpy)


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


def warm_up() -> None:
    """Load (or, with a cold cache, compile) every kernel now, with the types the wrappers pass.

    Call it before timing or before a thread that must not stall (a client's engine thread) first
    quantizes: a compilation takes seconds, a cache load tens of milliseconds.
    """
    x = np.zeros(8, np.float32)
    ints = np.zeros(8, np.int32)
    quantize(x, 1.0, 0, True, 0, 0, 0, 0, -1, 1, ints)
    quantize(x, 1.0, 0, False, 0, 0, 0, 0, -1, 1, ints)
    dequantize(ints, 1.0, 0, x, False)
    block_max_abs(x, 4)
    int_squared_norm(ints)


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
    if random:
        return int(k.quantize_random(_ro(x), _ro(scales), per_block, block, np.uint64(seed), int(rank),
                                     int(step), int(offset), int(lo), int(hi), out))
    return int(k.quantize_nearest(_ro(x), _ro(scales), per_block, block, int(lo), int(hi), out))


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
