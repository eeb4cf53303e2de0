"""The numba backend: fused, compiled CPU kernels, bit-identical to the numpy reference.

What it owns: one pass per kernel over memory (read float32, write int32), which is what makes
randomized rounding run near memcpy speed instead of the five passes and temporaries of numpy.

What it must never do: differ from `_numpy` by a single bit (tests compare them on random inputs),
import numba before a kernel is first used (a worker that never quantizes on CPU pays nothing), or
use fastmath (it would let LLVM fuse or reorder the float operations that fix the bits).

How it works: the same per-element rules as `_numpy` (read them there). Quantization walks groups
of four elements, one Philox4x32-10 call per group, so the generator costs a quarter call per
element; groups are split into chunks across threads with `prange`, each chunk counting its own
clipped elements. Compiled code is cached by numba (`cache=True`, in `__pycache__`).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["available", "quantize", "dequantize", "block_max_abs", "int_squared_norm"]

_GROUPS_PER_CHUNK = 4096  # 16 Ki elements per thread task: big enough to amortize scheduling
_SQNORM_CHUNK = 1 << 30   # elements per exact partial sum (see the int64 bound in _numpy)


def available() -> bool:
    """Whether numba imports (the dispatcher falls back to numpy otherwise)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    """Compile (or load from numba's cache) every kernel; called on first use only."""
    import numba
    from numba import njit, prange

    from switchagg.kernels._philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

    u64 = np.uint64
    mask, m0, m1, w0, w1, s32 = u64(0xFFFFFFFF), u64(PHILOX_M0), u64(PHILOX_M1), u64(PHILOX_W0), \
        u64(PHILOX_W1), u64(32)
    two_m32 = 2.0 ** -32
    jit = functools.partial(njit, cache=True, nogil=True, fastmath=False)

    @jit
    def philox(c0, c1, c2, c3, k0, k1):
        for _ in range(10):  # the key bump after the last round is never used
            p0 = c0 * m0
            p1 = c2 * m1
            c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & mask, (p0 >> s32) ^ c3 ^ k1, p0 & mask
            k0 = (k0 + w0) & mask
            k1 = (k1 + w1) & mask
        return c0, c1, c2, c3

    @jit
    def clip(r, lo, hi):
        """(int32 value, 1 if clipped) of a float64 integer-valued r; NaN -> clip(0), counted."""
        if r != r:
            return np.int32(min(max(0, lo), hi)), 1
        if r < lo:
            return np.int32(lo), 1
        if r > hi:
            return np.int32(hi), 1
        return np.int32(r), 0

    @jit
    def round_random(xj, sj, bits, lo, hi):
        td = np.float64(np.float32(xj * sj))  # t = fl32(x * scale), exact in float64
        f = np.floor(td)
        if np.float64(bits) * two_m32 < td - f:  # inf - inf is NaN: never rounds up
            f += 1.0
        return clip(f, lo, hi)

    @jit
    def scale_of(scales, per_block, block, j):
        return scales[j // block] if per_block else scales[0]

    @jit
    def quantize_random_groups(x, scales, per_block, block, k0, k1, c2, c3, first, offset, lo, hi,
                               out, g_start, g_end):
        """Groups g_start .. g_end - 1 (of four elements each); returns how many were clipped."""
        n = x.size
        clipped = 0
        for g in range(g_start, g_end):
            q = u64(first + g)
            b0, b1, b2, b3 = philox(q & mask, q >> s32, c2, c3, k0, k1)
            j0 = (first + g) * 4 - offset
            if j0 >= 0 and j0 + 3 < n:  # a whole group: the common case, no per-word checks
                v, k = round_random(x[j0], scale_of(scales, per_block, block, j0), b0, lo, hi)
                out[j0] = v
                clipped += k
                v, k = round_random(x[j0 + 1], scale_of(scales, per_block, block, j0 + 1), b1, lo, hi)
                out[j0 + 1] = v
                clipped += k
                v, k = round_random(x[j0 + 2], scale_of(scales, per_block, block, j0 + 2), b2, lo, hi)
                out[j0 + 2] = v
                clipped += k
                v, k = round_random(x[j0 + 3], scale_of(scales, per_block, block, j0 + 3), b3, lo, hi)
                out[j0 + 3] = v
                clipped += k
            else:  # the ragged first or last group of an offset piece
                for w in range(4):
                    j = j0 + w
                    if 0 <= j < n:
                        bits = b0 if w == 0 else (b1 if w == 1 else (b2 if w == 2 else b3))
                        v, k = round_random(x[j], scale_of(scales, per_block, block, j), bits, lo, hi)
                        out[j] = v
                        clipped += k
        return clipped

    @jit(parallel=True)
    def quantize_random(x, scales, per_block, block, seed, rank, step, offset, lo, hi, out):
        n = x.size
        first = offset // 4
        ngroups = (offset + n - 1) // 4 - first + 1
        k0, k1 = u64(seed) & mask, u64(seed) >> s32
        c2, c3 = u64(step), u64(rank)
        nchunks = (ngroups + _GROUPS_PER_CHUNK - 1) // _GROUPS_PER_CHUNK
        counts = np.zeros(nchunks, dtype=np.int64)
        for c in prange(nchunks):
            counts[c] = quantize_random_groups(x, scales, per_block, block, k0, k1, c2, c3, first,
                                               offset, lo, hi, out, c * _GROUPS_PER_CHUNK,
                                               min(ngroups, (c + 1) * _GROUPS_PER_CHUNK))
        return counts.sum()

    @jit
    def quantize_nearest_range(x, scales, per_block, block, lo, hi, out, j_start, j_end):
        clipped = 0
        for j in range(j_start, j_end):
            t = np.float32(x[j] * scale_of(scales, per_block, block, j))
            v, k = clip(np.rint(np.float64(t)), lo, hi)  # rint of the exact float64 of t
            out[j] = v
            clipped += k
        return clipped

    @jit(parallel=True)
    def quantize_nearest(x, scales, per_block, block, lo, hi, out):
        n = x.size
        step = 4 * _GROUPS_PER_CHUNK
        nchunks = (n + step - 1) // step
        counts = np.zeros(nchunks, dtype=np.int64)
        for c in prange(nchunks):
            counts[c] = quantize_nearest_range(x, scales, per_block, block, lo, hi, out, c * step,
                                               min(n, (c + 1) * step))
        return counts.sum()

    @jit(parallel=True)
    def dequantize(ints, divisors, per_block, block, out, accumulate):
        for j in prange(ints.size):
            d = divisors[j // block] if per_block else divisors[0]
            q = np.float32(np.float64(ints[j]) / d)
            if accumulate:
                out[j] = np.float32(out[j] + q)
            else:
                out[j] = q

    @jit(parallel=True)
    def max_abs_bits(bits, block, out):
        n = bits.size
        for b in prange(out.size):
            m = np.uint32(0)
            for j in range(b * block, min(n, (b + 1) * block)):
                v = bits[j] & np.uint32(0x7FFFFFFF)
                if v > m:
                    m = v
            out[b] = m

    @jit(parallel=True)
    def squared_norm_parts(ints):
        hi = 0
        lo = 0
        for j in prange(ints.size):
            v = np.int64(ints[j])
            sq = v * v  # <= 2^62
            hi += sq >> 31
            lo += sq & 0x7FFFFFFF
        return hi, lo

    del numba
    return dict(quantize_random=quantize_random, quantize_nearest=quantize_nearest,
                dequantize=dequantize, max_abs_bits=max_abs_bits, squared_norm_parts=squared_norm_parts)


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
    k = _kernels()
    scales, per_block = _as_array(scale, np.float32)
    if random:
        return int(k["quantize_random"](x, scales, per_block, block, np.uint64(seed), rank, step,
                                        offset, lo, hi, out))
    return int(k["quantize_nearest"](x, scales, per_block, block, lo, hi, out))


def dequantize(ints: np.ndarray, divisor, block: int, out: np.ndarray, accumulate: bool) -> None:
    """Same contract as `_numpy.dequantize`."""
    if ints.size:
        divisors, per_block = _as_array(divisor, np.float64)
        _kernels()["dequantize"](ints, divisors, per_block, block, out, accumulate)


def block_max_abs(x: np.ndarray, block: int) -> np.ndarray:
    """Same contract as `_numpy.block_max_abs`."""
    out = np.zeros(-(-x.size // block), dtype=np.uint32)
    if x.size:
        _kernels()["max_abs_bits"](x.view(np.uint32), block, out)
    return out.view(np.float32)


def int_squared_norm(ints: np.ndarray) -> int:
    """Same contract as `_numpy.int_squared_norm`."""
    hi_sum, lo_sum = 0, 0
    for start in range(0, ints.size, _SQNORM_CHUNK):
        hi, lo = _kernels()["squared_norm_parts"](ints[start:start + _SQNORM_CHUNK])
        hi_sum += int(hi)
        lo_sum += int(lo)
    return (hi_sum << 31) + lo_sum
