"""heuristic-global: the "Heuristic IntSGD" the IntSGD authors compared against.

Wire: one MAX all-reduce per bucket (the "profiling" round IntSGD avoids), then Int(alpha g_i) as
int32. alpha = M / (n 2^e) with e = floor(log2 max_i ||g_i||_inf) over the bucket and
M = 2^(b-1) - 1, one scale for the bucket (not per packet; in `switchagg compare` through DDP a
bucket is DDP's, with the in-process `Reducer` the whole gradient). Round to nearest by default
(biased).

The MAX travels as an int8 exponent, not a float: floor(log2 max_i m_i) = max_i floor(log2 m_i),
exactly, so the exponent MAX gives the authors' e bit for bit and also rides the switch's exponent
register. e is clamped to [-127, 127] (a max below 2^-127 then gets a smaller alpha: no overflow,
less resolution); -128 means every worker's bucket is zero. Because of the floor, alpha max|g| can
reach 2M/n: the budget clip catches it and clip_fraction reports it. The driver waits for the MAX
before encoding (in DDP's hook thread), so that round is not overlapped with backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from switchagg import kernels
from switchagg._choices import check_choice
from switchagg.codecs._base import Bucket, IntegerCodec, Max, Sum
from switchagg.scaling import global_exponent, global_scale

__all__ = ["HeuristicGlobal"]


@dataclass
class _GlobalCtx:
    q: torch.Tensor
    alpha: float
    clipped: int


class HeuristicGlobal(IntegerCodec):
    """One exponent per bucket from a MAX all-reduce; rounding "deterministic" or "random"."""

    needs = ("max", "sum")
    unbiased = False

    def __init__(self, *, rounding: str = "deterministic", **common) -> None:
        super().__init__(**common)
        self.rounding = check_choice("rounding", rounding)

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Max:
        local_max = float(x.abs().max()) if x.numel() else 0.0   # one scalar crosses
        e = global_exponent(local_max)
        local = np.array([-128 if e is None else min(max(e, -127), 127)], np.int8)

        def quantize_with(e_max: np.ndarray) -> Sum:
            top = int(e_max[0])
            alpha = 1.0 if top == -128 else global_scale(math.ldexp(1.0, top), self.n,
                                                         self.magnitude)
            res = kernels.quantize(x, alpha, rounding=self.rounding, seed=self.seed,
                                   rank=self.rank, step=self.step, offset=bucket.offset,
                                   lo=self.lo, hi=self.hi)
            return Sum(res.values, _GlobalCtx(res.values, alpha, res.clipped))

        return Max(local, quantize_with)

    def decode(self, reduced, ctx: _GlobalCtx, out: torch.Tensor) -> None:
        if reduced.numel():
            kernels.dequantize(reduced, self.n * ctx.alpha, out=out)
        self._record_ints(ctx.q, reduced, ctx.clipped)
        self._record_scales(ctx.alpha, ctx.alpha, ctx.alpha, "global-exponent")
