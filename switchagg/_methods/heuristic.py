"""heuristic-switchml: SwitchML's per-packet block-exponent scaling (Sapio et al., NSDI 2021).

Wire: int32 values; each packet also carries the int8 exponent of the chunk s packets ahead, the
switch keeps the max, so each all-reduce opens with one exponent-only batch (one extra round).
Deterministic round-to-nearest (biased; no convergence theory). Scale per chunk c:
f_c = M / (n 2^e_c) with e_c the max over workers of floor(log2 max|v|) + 1 and M = 2^(b-1) - 1;
decode sum / (n f_c). The sum cannot overflow (`switchagg.scaling.heuristic`), and the budget clip
makes that a guarantee for every b.

`heuristic_step` is also IntSGD's and IntDIANA's first step (r unknown yet: intsgd.md pitfall 4):
it exchanges only int8 exponents, so IntSGD stays floatless, and is near-lossless at b = 32.
"""

from __future__ import annotations

import time

import numpy as np

from switchagg import kernels
from switchagg._methods._base import IntegerMethod, Layout
from switchagg.scaling import block_scales
from switchagg.telemetry import StepTelemetry

__all__ = ["HeuristicSwitchML", "heuristic_step", "decode_chunked", "chunked_sq_norm"]


def heuristic_step(method: IntegerMethod, x: np.ndarray, step: int, tel: StepTelemetry
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize x with per-packet exponents, sum it, and return (q, sums, divisors).

    Returns:
        q: this worker's int32 values, len(x).
        sums: the int32 sum over workers, len(x).
        divisors: float64 per chunk, n * f_c: the average is sums / divisors (chunk-wise).
    """
    k, n, d = method.collective.k, method.n, x.size
    with method._timed("t_quantize"):
        exponents = kernels.block_exponents(x, k) if d else np.zeros(0, np.int8)
    chunks = exponents.size
    q = np.zeros(chunks * k, np.int32)
    scales = np.ones(chunks, np.float32)
    clipped, encode_time = [0], [0.0]

    def encode(first: int, stop: int, max_exponents: np.ndarray) -> np.ndarray:
        # Runs inside the collective (on the switch: in the client's engine thread, just before
        # chunks [first, stop) leave), so it is timed here and moved out of t_communicate below.
        t0 = time.perf_counter()
        f = block_scales(max_exponents, n, method.magnitude)
        a, b = first * k, min(stop * k, d)
        res = kernels.quantize(x[a:b], f, rounding="deterministic", seed=method.seed,
                               rank=method.collective.rank, step=step, offset=a, block=k,
                               lo=method.lo, hi=method.hi, out=q[a:b])
        scales[first:stop] = f
        clipped[0] += int(res.clipped)
        encode_time[0] += time.perf_counter() - t0
        return q[first * k:stop * k]

    t0 = time.perf_counter()
    sums, _ = method.collective.allreduce_int_stream(exponents, encode)
    tel.t_communicate += time.perf_counter() - t0 - encode_time[0]
    tel.t_quantize += encode_time[0]
    divisors = n * scales.astype(np.float64)
    method._record(tel, q[:d], sums[:d], clipped[0])
    if chunks:
        tel.alpha_min, tel.alpha_max = float(scales.min()), float(scales.max())
    return q[:d], sums[:d], divisors


def decode_chunked(sums: np.ndarray, divisors: np.ndarray, k: int) -> np.ndarray:
    """sums / divisor of their chunk, as float32 (`kernels.dequantize` with a per-block divisor)."""
    if sums.size == 0:
        return np.zeros(0, np.float32)
    return kernels.dequantize(sums, divisors, block=k)


def chunked_sq_norm(sums: np.ndarray, divisors: np.ndarray, k: int, start: int = 0,
                    stop: int | None = None) -> float:
    """||sums[start:stop] / divisor||^2, identical on every worker.

    The squared norm of each group of chunks sharing a divisor is exact (`int_squared_norm`); the
    groups are combined in float64 in ascending divisor order, so the result depends only on the
    integers and divisors every worker holds, never on a device's float reduction order.
    """
    stop = sums.size if stop is None else stop
    if stop <= start:
        return 0.0
    per_elem = np.repeat(divisors, k)[start:stop]
    part = sums[start:stop]
    total = 0.0
    for div in np.unique(per_elem):  # sorted ascending: a fixed order
        sq = kernels.int_squared_norm(np.ascontiguousarray(part[per_elem == div]))
        total += float(sq) / (float(div) * float(div))
    return total


class HeuristicSwitchML(IntegerMethod):
    """SwitchML's heuristic: per-packet exponents through the switch's MAX, round to nearest."""

    name = "heuristic-switchml"

    def _reduce_flat(self, x: np.ndarray, layout: Layout, step: int, lr: float,
                     tel: StepTelemetry) -> np.ndarray:
        tel.scaling = "block-exponent"
        _, sums, divisors = heuristic_step(self, x, step, tel)
        with self._timed("t_decode"):
            return decode_chunked(sums, divisors, self.collective.k)
