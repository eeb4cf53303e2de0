"""heuristic-global: the "Heuristic IntSGD" the IntSGD authors compared against (intsgd.md §3.2).

Wire: one MAX all-reduce per step (the "profiling" round IntSGD avoids), then Int(alpha g_i) as
int32. alpha = M / (n 2^e) with e = floor(log2 max_i ||g_i||_inf) and M = 2^(b-1) - 1, one scale
for the whole vector (not per packet). Round to nearest by default (biased).

The MAX travels as an int8 exponent, not a float: floor(log2 max_i m_i) = max_i floor(log2 m_i),
exactly, so the exponent MAX gives the authors' e bit for bit and also rides the switch's exponent
register. e is clamped to [-127, 127] (a max below 2^-127 then gets a smaller alpha: no overflow,
less resolution); -128 means every worker's gradient is zero. Because of the floor, alpha max|g|
can reach 2M/n: the budget clip catches it and clip_fraction reports it (pitfall 8).
"""

from __future__ import annotations

import math

import numpy as np

from switchagg import kernels
from switchagg._methods._base import IntegerMethod, Layout
from switchagg.scaling import global_exponent, global_scale
from switchagg.telemetry import StepTelemetry

__all__ = ["HeuristicGlobal"]


class HeuristicGlobal(IntegerMethod):
    """One global exponent per step from a MAX all-reduce; rounding "deterministic" or "random"."""

    name = "heuristic-global"

    def __init__(self, collective, *, rounding: str = "deterministic", **common) -> None:
        super().__init__(collective, **common)
        if rounding not in ("random", "deterministic"):
            raise ValueError(f"rounding must be 'random' or 'deterministic', got {rounding!r}")
        self.rounding = rounding

    def _reduce_flat(self, x: np.ndarray, layout: Layout, step: int, lr: float,
                     tel: StepTelemetry) -> np.ndarray:
        with self._timed("t_quantize"):
            local_max = float(np.abs(x).max()) if x.size else 0.0
            e = global_exponent(local_max)
            local = np.array([-128 if e is None else min(max(e, -127), 127)], np.int8)
        with self._timed("t_communicate"):
            e_max = int(self.collective.allreduce_max(local)[0])
        alpha = 1.0 if e_max == -128 else global_scale(math.ldexp(1.0, e_max), self.n, self.magnitude)
        tel.scaling, tel.alpha, tel.alpha_min, tel.alpha_max = "global-exponent", alpha, alpha, alpha
        q, clipped = self._quantize(x, alpha, rounding=self.rounding, step=step)
        sums = self._sum(q)
        self._record(tel, q, sums, clipped)
        with self._timed("t_decode"):
            return kernels.dequantize(sums, self.n * alpha) if x.size else np.zeros(0, np.float32)
