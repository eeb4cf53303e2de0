"""SwitchML's heuristic integer scaling, and the global variant the IntSGD authors compared against.

What it owns: turning block exponents into per-worker scale factors, and a maximum into a global
exponent. What it must never do: round or communicate (the kernels round; the collective carries
the exponents and keeps their max).

- heuristic-switchml (SwitchML, NSDI 2021; as the IntSGD paper describes it): each packet of k values has a local exponent
  e = floor(log2 max|v|) + 1 (the frexp exponent, `kernels.block_exponents`); the switch keeps the
  max over workers; every worker scales that chunk by f = M / (n 2^e_max) with M = 2^(b-1) - 1
  (2^31 - 1 for b = 32) and rounds to nearest. Since |v| < 2^e, n f |v| < M: the sum fits.
- heuristic-global (the IntSGD authors' `HintQuantReducer`): one MAX all-reduce of
  ||g_i||_inf per step, e = floor(log2 max), alpha = M / (n 2^e). Note the floor: alpha max|g| lies in
  [M/n, 2M/n), so without the budget clip the sum could exceed the range by up to 2x (pitfall 8).

Both are clipped to the budget (`budget.clip_bounds`) as well: rounding to nearest can carry one
worker's value to ceil(M / n) > floor(M / n) when M / n is not an integer (b = 8, n = 16: 7.94 -> 8,
and 16 x 8 = 128 wraps int8), and the clip makes "never wraps" a guarantee instead of a likelihood.

The scale is a float32 (the kernel applies it as one). It is computed in float64 and then rounded;
for chunks whose max exponent is tiny (< -96) f would overflow float32, so it is capped at 2^126:
such chunks (all |v| < 2^-96) lose resolution, never range. An all-zero chunk (exponent -128 from
every worker) gets scale 1.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ZERO_EXPONENT", "SCALE_CAP", "block_scales", "global_exponent", "global_scale"]

#: `kernels.block_exponents` marks an all-zero block with this exponent.
ZERO_EXPONENT = -128
#: Largest scale used: 2^126 keeps f and n * f finite in float32 for any n < 2^2.
SCALE_CAP = 2.0 ** 126


def block_scales(max_exponents: np.ndarray, world_size: int, magnitude: int) -> np.ndarray:
    """Per-chunk scales f_c = M / (n 2^e_c) as float32, from the max exponent of each chunk.

    Args:
        max_exponents: int8 max over workers of each chunk's block exponent.
        world_size: n.
        magnitude: M, the largest positive value of the budgeted sum (`budget.max_magnitude`).
    """
    e = np.asarray(max_exponents).astype(np.int64)
    f = np.ldexp(np.float64(magnitude) / world_size, -e)
    f = np.where(e == ZERO_EXPONENT, 1.0, np.minimum(f, SCALE_CAP))
    return f.astype(np.float32)


def global_exponent(max_abs: float) -> int | None:
    """floor(log2 max_abs), exactly (frexp, no log rounding); None for 0."""
    if max_abs == 0.0:
        return None
    mantissa, exp = math.frexp(max_abs)  # max_abs = mantissa * 2^exp, mantissa in [0.5, 1)
    return exp - 1


def global_scale(max_abs: float, world_size: int, magnitude: int) -> float:
    """alpha = M / (n 2^floor(log2 max_abs)) as a float32 value (1.0 when everything is zero)."""
    e = global_exponent(max_abs)
    if e is None:
        return 1.0
    return float(np.float32(min(math.ldexp(magnitude / world_size, -e), SCALE_CAP)))
