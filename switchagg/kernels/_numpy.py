"""The numpy reference backend: every quantization kernel, vectorized, and the oracle of the others.

What it owns: the exact arithmetic of each kernel, written as plainly as vectorized numpy allows, so a
reader can check it against the rules below and every faster backend (numba, CUDA) is tested against
it bit for bit. It is also the fallback when numba is missing.

What it must never do: validate or convert arguments (the dispatcher in `switchagg.kernels` does that
once for every backend), or allocate outputs it was handed. Inputs here are already float32 / int32
numpy arrays, scales float32, divisors float64, bounds Python ints.

The rules (shared by every backend; the CUDA header `cuda/quantize_math.cuh` spells them per element):
- t = fl32(x * scale): one float32 multiply, correctly rounded, never fused with anything.
- randomized: f = floor(t) and frac = t - f, both computed in float64 where they are exact; the
  element's Philox bits b (see `_philox.element_bits`) round up iff b / 2^32 < frac. So
  P(up) = ceil(frac 2^32) / 2^32: unbiased to within 2^-32 per element.
- deterministic: round half to even of t (np.rint on float32).
- clip to [lo, hi], counting clipped elements; +-inf clip like huge values; NaN becomes
  min(max(0, lo), hi) and is counted as clipped, so a caller watching the count sees it.
- dequantize: fl32(float64(int) / float64(divisor)); the accumulating form then adds that into the
  float32 target with one float32 add (IntDIANA's shift updates).
- block max |x|: integer max of the float32 bit patterns with the sign cleared (the order of
  non-negative floats is the order of their bits, and NaN sorts above inf, so NaN propagates).
- exponent of m = block max: the frexp exponent e (2^(e-1) <= m < 2^e) read from the bit fields,
  -128 for m = 0, clamped to [-127, 127]; the dispatcher rejects inf/NaN before this.
- squared norm of an int32 array: each square (< 2^62) split at bit 31 into a high and a low part,
  each summed in int64 over chunks small enough never to overflow, joined as Python ints.
"""

from __future__ import annotations

import numpy as np

from switchagg.kernels._philox import element_bits

__all__ = ["quantize", "dequantize", "block_max_abs", "exponents_from_max", "int_squared_norm"]

_TWO_M32 = 2.0 ** -32
_SQNORM_CHUNK = 1 << 24  # elements per partial sum: 2^24 * 2^31 < 2^63, so no int64 overflow


def _per_element(values, block: int, n: int):
    """A scalar stays a scalar; a per-block array is repeated to one value per element."""
    if np.ndim(values) == 0:
        return values
    return np.repeat(values, block)[:n]


def quantize(x: np.ndarray, scale, block: int, random: bool, seed: int, rank: int, step: int,
             offset: int, lo: int, hi: int, out: np.ndarray) -> int:
    """Scale, round and clip float32 `x` into int32 `out` (rules in the module docstring).

    Returns:
        How many elements were clipped (NaN included).
    """
    n = x.size
    # Overflow to inf is a rule, not an accident (inf clips to hi); inf - inf is NaN: never rounds up.
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.multiply(x, _per_element(scale, block, n), dtype=np.float32)
        if random:
            td = t.astype(np.float64)
            r = np.floor(td)
            frac = td - r
            bits = element_bits(seed, rank, step, offset, n)
            r += bits.astype(np.float64) * _TWO_M32 < frac
        else:
            r = np.rint(t).astype(np.float64)
        nan = np.isnan(r)
        below, above = r < lo, r > hi
    clipped = int(np.count_nonzero(nan)) + int(np.count_nonzero(below)) + int(np.count_nonzero(above))
    np.clip(r, lo, hi, out=r)
    r[nan] = min(max(0, lo), hi)
    out[...] = r.astype(np.int32)
    return clipped


def dequantize(ints: np.ndarray, divisor, block: int, out: np.ndarray, accumulate: bool) -> None:
    """out = fl32(ints / divisor), or out += that (one float32 add) when `accumulate`."""
    q = (ints.astype(np.float64) / _per_element(divisor, block, ints.size)).astype(np.float32)
    if accumulate:
        np.add(out, q, out=out)
    else:
        out[...] = q


def block_max_abs(x: np.ndarray, block: int) -> np.ndarray:
    """max |x| per consecutive block of `block` elements (the last may be short), as float32."""
    n = x.size
    nb = -(-n // block)
    bits = np.zeros(nb * block, dtype=np.uint32)
    bits[:n] = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return bits.reshape(nb, block).max(axis=1).view(np.float32)


def exponents_from_max(m: np.ndarray) -> np.ndarray:
    """frexp exponent of each finite non-negative float32 in `m`; -128 for zero; else clamped to +-127."""
    bits = m.view(np.uint32).astype(np.int64)
    field = bits >> 23
    # normal: m = 1.f 2^(field-127), so 2^(e-1) <= m < 2^e with e = field - 126; a subnormal is
    # below 2^-126 (e <= -126): e = -126 when its top mantissa bit is set, else <= -127 (clamped).
    e = np.where(field > 0, field - 126, np.where(bits >= (1 << 22), -126, -127))
    e = np.clip(e, -127, 127)
    return np.where(bits == 0, -128, e).astype(np.int8)


def int_squared_norm(ints: np.ndarray) -> int:
    """Exact sum of squares of an int32 array, as a Python int."""
    hi_sum, lo_sum = 0, 0
    for start in range(0, ints.size, _SQNORM_CHUNK):
        v = ints[start:start + _SQNORM_CHUNK].astype(np.int64)
        sq = v * v  # <= 2^62: exact in int64
        hi_sum += int((sq >> 31).sum())
        lo_sum += int((sq & 0x7FFFFFFF).sum())
    return (hi_sum << 31) + lo_sum
