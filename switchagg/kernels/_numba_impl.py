"""The numba kernels themselves: module-level jitted functions, imported on first use only.

What it owns: the compiled loops behind `_numba` (read the essay there for what each one does and
why it is shaped that way). What it must never do: be imported by `import switchagg.kernels` (it
imports numba, ~0.5 s), close over per-process objects, or use fastmath (it would let LLVM fuse or
reorder the float operations that fix the bits).

Why module level: numba's on-disk cache (`cache=True`) keys a compiled function by its source file,
qualified name and argument types, and a function that calls another jitted function is cached
with that callee linked in. Kernels defined as closures inside a function got a new callee
dispatcher per process and missed the cache every time (17-30 s of compilation per process).
Defined here, at module level and calling each other directly, they load from the cache in every
process after the first. Numba compiles each one lazily, on its first call with a new signature.

Where the cache lives: `__pycache__` beside this file, or NUMBA_CACHE_DIR if set. Where neither is
writable numba warns and compiles in memory (correct, only slower to start).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from switchagg.kernels._philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

__all__ = ["TILE_GROUPS", "CHUNK_TILES", "quantize_random", "quantize_random_parallel",
           "quantize_nearest", "quantize_nearest_parallel", "dequantize", "max_abs_bits",
           "squared_norm_parts"]

TILE_GROUPS = 1024  # Philox groups per tile: 4096 elements, whose bits (16 KiB) stay in L1
CHUNK_TILES = 16    # tiles per parallel work item: 64 Ki elements, so per-item setup is noise

# Globals are frozen into the compiled code as constants.
_U64, _U32 = np.uint64, np.uint32
_M0, _M1, _S32 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(32)
_W0, _W1 = np.uint32(PHILOX_W0), np.uint32(PHILOX_W1)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO_M32 = 2.0 ** -32

# Serial by default (measured on the 2-core box): the workers of a local run share the cores with
# the switch and each other, per-packet calls (1024 elements) ran 13 us serial against 18-22 us
# with parallel=True, and parallel compiles are slower. nogil lets a caller's threads run kernels
# side by side instead. Only the two `*_parallel` quantize drivers use numba's threads; `_numba`
# calls them for large inputs (see PARALLEL_MIN_ELEMENTS there), and they run the same per-tile body.
_jit = dict(cache=True, nogil=True, fastmath=False)
_jit_parallel = dict(_jit, parallel=True)
# The callers run the parallel drivers with numba's parallel chunk size at 1 (dynamic scheduling, one
# work item of CHUNK_TILES tiles at a time; set there because setting it in here defeats the cache).


@njit(**_jit)
def philox_rounds(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 in place over arrays of counter words (one lane per counter).

    The round is the inner loop, over independent counters, so LLVM vectorizes it (vpmuludq does
    four 32 x 32 -> 64 products); a loop over counters with the rounds inside does not.
    """
    for _ in range(10):
        for i in range(c0.size):
            p0 = _U64(c0[i]) * _M0
            p1 = _U64(c2[i]) * _M1
            a0 = _U32(p1 >> _S32) ^ c1[i] ^ k0
            a2 = _U32(p0 >> _S32) ^ c3[i] ^ k1
            c0[i] = a0
            c1[i] = _U32(p1)
            c2[i] = a2
            c3[i] = _U32(p0)
        k0 = k0 + _W0  # uint32 arithmetic wraps: the Weyl key schedule
        k1 = k1 + _W1


@njit(**_jit)
def tile_bits(q0, c2, c3, k0, k1, c, bits):
    """bits[4 i + w] = word w of Philox(counter (q0 + i, step, rank)), i < TILE_GROUPS."""
    g = c.shape[1]
    for i in range(g):
        q = _U64(q0 + i)
        c[0, i] = _U32(q & _LOW32)
        c[1, i] = _U32(q >> _S32)
        c[2, i] = c2
        c[3, i] = c3
    philox_rounds(c[0], c[1], c[2], c[3], k0, k1)
    for i in range(g):
        bits[4 * i] = c[0, i]
        bits[4 * i + 1] = c[1, i]
        bits[4 * i + 2] = c[2, i]
        bits[4 * i + 3] = c[3, i]


@njit(**_jit)
def round_random_run(x, s, per_element, bits, flo, fhi, fnan, out):
    """Quantize x into out, element i drawing bits[i]; returns the clipped count.

    The scale is s[i] if per_element else s[0] (a loop-invariant branch LLVM unswitches).
    Branch-free otherwise (selects, min/max) and zero-based over slices, so LLVM vectorizes it:
    indexing with an offset (bits[j - shift]) makes numba emit negative-index wraparound, 4x slower.
    """
    clipped = 0
    for i in range(x.size):
        sc = s[i] if per_element else s[0]
        td = np.float64(np.float32(x[i] * sc))  # t = fl32(x * scale), exact in float64
        f = np.floor(td)
        up = np.float64(bits[i]) * _TWO_M32 < td - f  # inf - inf is NaN: never rounds up
        f = f + 1.0 if up else f
        r = min(max(f, flo), fhi)
        isnan = f != f
        clipped += np.int64((f != r) | isnan)
        out[i] = np.int32(fnan if isnan else r)
    return clipped


@njit(**_jit)
def round_nearest_run(x, s, per_element, flo, fhi, fnan, out):
    """Round half to even (rint of the exact float64 of t); returns the clipped count."""
    clipped = 0
    for i in range(x.size):
        sc = s[i] if per_element else s[0]
        f = np.rint(np.float64(np.float32(x[i] * sc)))
        r = min(max(f, flo), fhi)
        isnan = f != f
        clipped += np.int64((f != r) | isnan)
        out[i] = np.int32(fnan if isnan else r)
    return clipped


@njit(**_jit)
def tile_scales(scales, block, ja, jb, sbuf):
    """sbuf[i] = scale of element ja + i (per-block scales spread over one tile)."""
    j = ja
    while j < jb:
        b = j // block
        je = min(jb, (b + 1) * block)
        sbuf[j - ja:je - ja] = scales[b]
        j = je


@njit(**_jit)
def random_tiles(x, scales, per_block, block, q_first, offset, c2, c3, k0, k1, flo, fhi, fnan, out,
                 t0, t1, counts):
    """Quantize tiles t0 <= t < t1 of quantize_random's tiling into out; counts[t] = tile t's clips.

    The one body of both drivers, serial and parallel: tile t always covers the Philox groups from
    q_first + t * TILE_GROUPS, whichever thread runs it, so sharing tiles out cannot change a bit.
    """
    n = x.size
    c = np.empty((4, TILE_GROUPS), dtype=np.uint32)
    bits = np.empty(4 * TILE_GROUPS, dtype=np.uint32)
    for t in range(t0, t1):
        q0 = q_first + t * TILE_GROUPS
        tile_bits(q0, c2, c3, k0, k1, c, bits)
        shift = 4 * q0 - offset  # element j's bits are bits[j - shift]
        ja = max(0, shift)
        jb = min(n, shift + 4 * TILE_GROUPS)
        if ja >= jb:
            continue
        s = scales
        if per_block:
            s = np.empty(jb - ja, dtype=np.float32)
            tile_scales(scales, block, ja, jb, s)
        counts[t] = round_random_run(x[ja:jb], s, per_block, bits[ja - shift:jb - shift], flo, fhi,
                                     fnan, out[ja:jb])


@njit(**_jit)
def nearest_tiles(x, scales, per_block, block, flo, fhi, fnan, out, t0, t1, counts):
    """Round half to even over tiles t0 <= t < t1 of 4 TILE_GROUPS elements; counts[t] = clips."""
    n = x.size
    tile = 4 * TILE_GROUPS
    for t in range(t0, t1):
        ja = t * tile
        jb = min(n, ja + tile)
        s = scales
        if per_block:
            s = np.empty(jb - ja, dtype=np.float32)
            tile_scales(scales, block, ja, jb, s)
        counts[t] = round_nearest_run(x[ja:jb], s, per_block, flo, fhi, fnan, out[ja:jb])


@njit(**_jit)
def random_tiling(n, offset):
    """(first Philox group, tile count) of quantize_random's tiling, aligned in global index."""
    q_first = offset // 4
    return q_first, ((offset + n - 1) // 4 - q_first) // TILE_GROUPS + 1


@njit(**_jit)
def quantize_random(x, scales, per_block, block, seed, rank, step, offset, lo, hi, out):
    """Tiles of TILE_GROUPS Philox groups, aligned in global index; returns the clipped count."""
    q_first, ntiles = random_tiling(x.size, offset)
    k0, k1 = _U32(_U64(seed) & _LOW32), _U32(_U64(seed) >> _S32)
    flo, fhi, fnan = np.float64(lo), np.float64(hi), np.float64(min(max(0, lo), hi))
    counts = np.zeros(ntiles, dtype=np.int64)
    random_tiles(x, scales, per_block, block, q_first, offset, _U32(step), _U32(rank), k0, k1, flo,
                 fhi, fnan, out, 0, ntiles, counts)
    return counts.sum()


@njit(**_jit_parallel)
def quantize_random_parallel(x, scales, per_block, block, seed, rank, step, offset, lo, hi, out):
    """quantize_random with runs of CHUNK_TILES of its tiles shared out over numba's threads."""
    q_first, ntiles = random_tiling(x.size, offset)
    k0, k1 = _U32(_U64(seed) & _LOW32), _U32(_U64(seed) >> _S32)
    flo, fhi, fnan = np.float64(lo), np.float64(hi), np.float64(min(max(0, lo), hi))
    counts = np.zeros(ntiles, dtype=np.int64)
    for ch in prange((ntiles + CHUNK_TILES - 1) // CHUNK_TILES):
        random_tiles(x, scales, per_block, block, q_first, offset, _U32(step), _U32(rank), k0, k1,
                     flo, fhi, fnan, out, ch * CHUNK_TILES, min(ntiles, (ch + 1) * CHUNK_TILES),
                     counts)
    return counts.sum()


@njit(**_jit)
def quantize_nearest(x, scales, per_block, block, lo, hi, out):
    """Round half to even in tiles of 4 TILE_GROUPS elements; returns the clipped count."""
    ntiles = (x.size + 4 * TILE_GROUPS - 1) // (4 * TILE_GROUPS)
    flo, fhi, fnan = np.float64(lo), np.float64(hi), np.float64(min(max(0, lo), hi))
    counts = np.zeros(ntiles, dtype=np.int64)
    nearest_tiles(x, scales, per_block, block, flo, fhi, fnan, out, 0, ntiles, counts)
    return counts.sum()


@njit(**_jit_parallel)
def quantize_nearest_parallel(x, scales, per_block, block, lo, hi, out):
    """quantize_nearest with runs of CHUNK_TILES of its tiles shared out over numba's threads."""
    ntiles = (x.size + 4 * TILE_GROUPS - 1) // (4 * TILE_GROUPS)
    flo, fhi, fnan = np.float64(lo), np.float64(hi), np.float64(min(max(0, lo), hi))
    counts = np.zeros(ntiles, dtype=np.int64)
    for ch in prange((ntiles + CHUNK_TILES - 1) // CHUNK_TILES):
        nearest_tiles(x, scales, per_block, block, flo, fhi, fnan, out, ch * CHUNK_TILES,
                      min(ntiles, (ch + 1) * CHUNK_TILES), counts)
    return counts.sum()


@njit(**_jit)
def dequantize(ints, divisors, per_block, block, out, accumulate):
    """out = fl32(ints / divisor), or out = fl32(out + that) when accumulating.

    One loop per case, each branch-free, so LLVM vectorizes them (a branch on the flags inside one
    loop kept it scalar, 4x slower).
    """
    n = ints.size
    if not per_block:
        d = divisors[0]
        if accumulate:
            for j in range(n):
                out[j] = np.float32(out[j] + np.float32(np.float64(ints[j]) / d))
        else:
            for j in range(n):
                out[j] = np.float32(np.float64(ints[j]) / d)
        return
    for b in range(divisors.size):
        d = divisors[b]
        ja = b * block
        jb = min(n, ja + block)
        if accumulate:
            for j in range(ja, jb):
                out[j] = np.float32(out[j] + np.float32(np.float64(ints[j]) / d))
        else:
            for j in range(ja, jb):
                out[j] = np.float32(np.float64(ints[j]) / d)


@njit(**_jit)
def max_abs_bits(bits, block, out):
    """out[b] = max of the float32 bit patterns of block b with the sign cleared (NaN stays max)."""
    n = bits.size
    for b in range(out.size):
        m = np.uint32(0)
        for j in range(b * block, min(n, (b + 1) * block)):
            v = bits[j] & np.uint32(0x7FFFFFFF)
            if v > m:
                m = v
        out[b] = m


@njit(**_jit)
def squared_norm_parts(ints):
    """(sum of sq >> 31, sum of sq & (2^31 - 1)) over ints: an exact split of the sum of squares."""
    hi = 0
    lo = 0
    for j in range(ints.size):
        v = np.int64(ints[j])
        sq = v * v  # <= 2^62
        hi += sq >> 31
        lo += sq & 0x7FFFFFFF
    return hi, lo
