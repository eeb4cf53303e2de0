"""The numba backend: fused, compiled CPU kernels, bit-identical to the numpy reference.

What it owns: one pass per kernel over memory (read float32, write int32), which is what makes
randomized rounding run near memcpy speed instead of the five passes and temporaries of numpy.

What it must never do: differ from `_numpy` by a single bit (tests compare them on random inputs),
import numba before a kernel is first used (a worker that never quantizes on CPU pays nothing), or
use fastmath (it would let LLVM fuse or reorder the float operations that fix the bits).

How it works: the same per-element rules as `_numpy` (read them there). Randomized rounding works
in tiles of 1024 Philox groups (4096 elements), aligned in global element index, one tile per
`prange` task: (1) the tile's counters go into four word arrays and the ten rounds run over them
with the counters as the inner loop, which LLVM vectorizes (AVX2 vpmuludq); (2) the words are
interleaved into element order in an L1-resident buffer; (3) a branch-free loop (selects only, also
vectorized) scales, rounds and clips the tile, counting clipped elements; per-block scales are
first spread into a per-element tile buffer, so short blocks (k = 64) cost no extra calls. Tiles
never share output, so threads need no locks. Compiled code is cached by numba (`cache=True`, in
`__pycache__`, which git ignores).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["available", "quantize", "dequantize", "block_max_abs", "int_squared_norm"]

_TILE_GROUPS = 1024  # Philox groups per thread task: 4096 elements, whose bits (16 KiB) stay in L1
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
    from numba import njit, prange

    from switchagg.kernels._philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

    u64, u32 = np.uint64, np.uint32
    m0, m1, s32 = u64(PHILOX_M0), u64(PHILOX_M1), u64(32)
    w0, w1 = u32(PHILOX_W0), u32(PHILOX_W1)
    two_m32 = 2.0 ** -32
    jit = functools.partial(njit, cache=True, nogil=True, fastmath=False)

    @jit
    def philox_rounds(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 in place over arrays of counter words (one lane per counter).

        The round is the inner loop, over independent counters, so LLVM vectorizes it (vpmuludq
        does four 32 x 32 -> 64 products); a loop over counters with the rounds inside does not.
        """
        for _ in range(10):
            for i in range(c0.size):
                p0 = u64(c0[i]) * m0
                p1 = u64(c2[i]) * m1
                a0 = u32(p1 >> s32) ^ c1[i] ^ k0
                a2 = u32(p0 >> s32) ^ c3[i] ^ k1
                c0[i] = a0
                c1[i] = u32(p1)
                c2[i] = a2
                c3[i] = u32(p0)
            k0 = k0 + w0  # uint32 arithmetic wraps: the Weyl key schedule
            k1 = k1 + w1

    @jit
    def tile_bits(q0, c2, c3, k0, k1, c, bits):
        """bits[4 i + w] = word w of Philox(counter (q0 + i, step, rank)), i < TILE_GROUPS."""
        g = c.shape[1]
        for i in range(g):
            q = u64(q0 + i)
            c[0, i] = u32(q & u64(0xFFFFFFFF))
            c[1, i] = u32(q >> s32)
            c[2, i] = c2
            c[3, i] = c3
        philox_rounds(c[0], c[1], c[2], c[3], k0, k1)
        for i in range(g):
            bits[4 * i] = c[0, i]
            bits[4 * i + 1] = c[1, i]
            bits[4 * i + 2] = c[2, i]
            bits[4 * i + 3] = c[3, i]

    @jit
    def round_random_run(x, s, per_element, bits, flo, fhi, fnan, out):
        """Quantize x into out, element i drawing bits[i]; returns the clipped count.

        The scale is s[i] if per_element else s[0] (a loop-invariant branch LLVM unswitches).
        Branch-free otherwise (selects, min/max) and zero-based over slices, so LLVM vectorizes it:
        indexing with an offset (bits[j - shift]) makes numba emit negative-index wraparound, 4x
        slower.
        """
        clipped = 0
        for i in range(x.size):
            sc = s[i] if per_element else s[0]
            td = np.float64(np.float32(x[i] * sc))  # t = fl32(x * scale), exact in float64
            f = np.floor(td)
            up = np.float64(bits[i]) * two_m32 < td - f  # inf - inf is NaN: never rounds up
            f = f + 1.0 if up else f
            r = min(max(f, flo), fhi)
            isnan = f != f
            clipped += np.int64((f != r) | isnan)
            out[i] = np.int32(fnan if isnan else r)
        return clipped

    @jit
    def round_nearest_run(x, s, per_element, flo, fhi, fnan, out):
        clipped = 0
        for i in range(x.size):
            sc = s[i] if per_element else s[0]
            f = np.rint(np.float64(np.float32(x[i] * sc)))  # rint of the exact float64 of t
            r = min(max(f, flo), fhi)
            isnan = f != f
            clipped += np.int64((f != r) | isnan)
            out[i] = np.int32(fnan if isnan else r)
        return clipped

    @jit
    def tile_scales(scales, block, ja, jb, sbuf):
        """sbuf[i] = scale of element ja + i (per-block scales spread over one tile)."""
        j = ja
        while j < jb:
            b = j // block
            je = min(jb, (b + 1) * block)
            sbuf[j - ja:je - ja] = scales[b]
            j = je

    @jit(parallel=True)
    def quantize_random(x, scales, per_block, block, seed, rank, step, offset, lo, hi, out):
        """Tiles of TILE_GROUPS Philox groups, aligned in global index, one per thread task."""
        n = x.size
        q_first = offset // 4
        ntiles = ((offset + n - 1) // 4 - q_first) // _TILE_GROUPS + 1
        k0, k1 = u32(u64(seed) & u64(0xFFFFFFFF)), u32(u64(seed) >> s32)
        flo, fhi, fnan = np.float64(lo), np.float64(hi), np.float64(min(max(0, lo), hi))
        counts = np.zeros(ntiles, dtype=np.int64)
        for t in prange(ntiles):
            c = np.empty((4, _TILE_GROUPS), dtype=np.uint32)
            bits = np.empty(4 * _TILE_GROUPS, dtype=np.uint32)
            q0 = q_first + t * _TILE_GROUPS
            tile_bits(q0, u32(step), u32(rank), k0, k1, c, bits)
            shift = 4 * q0 - offset  # element j's bits are bits[j - shift]
            ja = max(0, shift)
            jb = min(n, shift + 4 * _TILE_GROUPS)
            if ja >= jb:
                continue
            s = scales
            if per_block:
                s = np.empty(jb - ja, dtype=np.float32)
                tile_scales(scales, block, ja, jb, s)
            counts[t] = round_random_run(x[ja:jb], s, per_block, bits[ja - shift:jb - shift], flo,
                                         fhi, fnan, out[ja:jb])
        return counts.sum()

    @jit(parallel=True)
    def quantize_nearest(x, scales, per_block, block, lo, hi, out):
        n = x.size
        tile = 4 * _TILE_GROUPS
        ntiles = (n + tile - 1) // tile
        flo, fhi, fnan = np.float64(lo), np.float64(hi), np.float64(min(max(0, lo), hi))
        counts = np.zeros(ntiles, dtype=np.int64)
        for t in prange(ntiles):
            ja = t * tile
            jb = min(n, ja + tile)
            s = scales
            if per_block:
                s = np.empty(jb - ja, dtype=np.float32)
                tile_scales(scales, block, ja, jb, s)
            counts[t] = round_nearest_run(x[ja:jb], s, per_block, flo, fhi, fnan, out[ja:jb])
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
