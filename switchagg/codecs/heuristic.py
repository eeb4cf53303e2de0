"""heuristic-switchml: SwitchML's per-packet block-exponent scaling (Sapio et al., NSDI 2021).

Wire: int32 values; each packet also carries the int8 exponent of the chunk s packets ahead and
the switch keeps the max, so each reduction opens with one exponent-only batch (one extra round).
Deterministic round-to-nearest: biased, no convergence theory. Scale of chunk c:
f_c = M / (n 2^e_c), e_c the max over workers of floor(log2 max|v|) + 1, M = 2^(b-1) - 1; decode
S_c / (n f_c). The sum cannot overflow (`switchagg.scaling.heuristic`), and the budget clip makes
that a guarantee for every b.

`switchml_stream` is also IntSGD's and IntDIANA's first step (r unknown yet): it exchanges only int8
exponents, so IntSGD stays floatless, and it is near-lossless at b = 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from switchagg import kernels
from switchagg.codecs._base import Bucket, IntegerCodec, Stream, host_int8
from switchagg.scaling import block_scales

__all__ = ["HeuristicSwitchML", "switchml_stream", "StreamCtx", "decode_chunked",
           "chunked_sq_norm"]


@dataclass
class StreamCtx:
    """What a look-ahead stream leaves for its decode: this worker's integers and chunk scales."""

    bucket: Bucket
    q: torch.Tensor            # int32, chunks * k (x's device)
    scales: np.ndarray         # float32 per chunk, filled as chunks are encoded
    clipped: list[int]

    @property
    def divisors(self) -> np.ndarray:
        """n f_c per chunk (float64): the average of chunk c is S_c / divisors[c]."""
        return self.n * self.scales.astype(np.float64)

    n: int = 1


def switchml_stream(codec: IntegerCodec, x: torch.Tensor, bucket: Bucket) -> Stream:
    """x as a look-ahead stream: per-chunk exponents first, each chunk scaled by their max."""
    k, d = codec.k, x.numel()
    exponents = host_int8(kernels.block_exponents(x, k)) if d else np.zeros(0, np.int8)
    chunks = exponents.size
    ctx = StreamCtx(bucket, torch.zeros(chunks * k, dtype=torch.int32, device=x.device),
                    np.ones(chunks, np.float32), [0], n=codec.n)

    def encode(c0: int, c1: int, max_exponents: np.ndarray) -> torch.Tensor:
        # On the switch this runs in the client's engine thread, just before chunks [c0, c1) leave.
        f = block_scales(max_exponents, codec.n, codec.magnitude)
        a, b = c0 * k, min(c1 * k, d)
        res = kernels.quantize(x[a:b], f, rounding="deterministic", block=k, lo=codec.lo,
                               hi=codec.hi, out=ctx.q[a:b])
        ctx.scales[c0:c1] = f
        ctx.clipped[0] += int(res.clipped)
        return ctx.q[c0 * k:c1 * k]

    return Stream(exponents, encode, d, ctx)


def decode_chunked(sums, divisors: np.ndarray, k: int, out) -> None:
    """out = sums / divisor of their chunk (float32), `kernels.dequantize` with per-chunk divisors."""
    if sums.shape[0]:
        kernels.dequantize(sums, divisors, block=k, out=out)


def chunked_sq_norm(sums, divisors: np.ndarray, k: int, start: int = 0,
                    stop: int | None = None) -> float:
    """||sums[start:stop] / divisor||^2, identical on every worker.

    The squared norm of each group of chunks sharing a divisor is exact (`int_squared_norm`); the
    groups are combined in float64 in ascending divisor order, so the result depends only on the
    integers and divisors every worker holds, never on a device's float reduction order.
    """
    stop = sums.shape[0] if stop is None else stop
    if stop <= start:
        return 0.0
    per_elem = np.repeat(divisors, k)[start:stop]
    part = sums[start:stop]
    total = 0.0
    for div in np.unique(per_elem):  # sorted ascending: a fixed order
        idx = np.flatnonzero(per_elem == div)
        if isinstance(part, torch.Tensor):
            picked = part[torch.from_numpy(idx).to(part.device)]
        else:
            picked = np.ascontiguousarray(part[idx])
        total += float(kernels.int_squared_norm(picked)) / (float(div) * float(div))
    return total


class HeuristicSwitchML(IntegerCodec):
    """SwitchML's heuristic: per-packet exponents through the switch's MAX, round to nearest."""

    needs = ("stream",)
    unbiased = False

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Stream:
        return switchml_stream(self, x, bucket)

    def decode(self, reduced, ctx: StreamCtx, out: torch.Tensor) -> None:
        sums, _ = reduced
        divisors = ctx.divisors
        decode_chunked(sums, divisors, self.k, out)
        d = ctx.bucket.numel
        self._record_ints(ctx.q[:d], sums, ctx.clipped[0])
        if ctx.scales.size:
            self._record_scales(float(ctx.scales.min()), float(ctx.scales.max()), None,
                                "block-exponent")
