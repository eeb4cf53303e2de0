"""The squared norm of float32 tensors that every worker computes to the same bits, on any device.

What it owns: `float_sq_norm`, ||v||^2 of float32 tensors as a float64 that depends only on the
values (and on how they are split into tensors), for scales that must be identical on every
worker: IntDIANA's alpha from the full step ||h^{k+1}||, the uncompressed first step's length.
What it must never do: depend on a reduction order, a thread count or a device (a float sum does:
torch's CPU and CUDA reductions add in different orders), or copy the floats to the host.

How it works: per tensor of n elements, with M = max |v| (a max is exact and order-free), the
squares v^2 are formed in float64 (exact: 48 significant bits), multiplied by the power of two
2^K that puts M^2 just under 2^(62 - ceil(log2 n)) (exact, or a correctly rounded underflow), and
truncated to int64; their int64 sum cannot overflow, and integer sums are exact and order-free on
every device. Every elementwise step is one IEEE operation, the same bits on CPU and CUDA. Only
that sum and K (integers) cross to the host; Python's exact integers combine the tensors and
`int -> float` rounds once. The truncation makes it deterministic rather than exact: the relative
error is below n^2 2^-61 (below 2e-6 for a million elements), far under what a scale needs.
"""

from __future__ import annotations

import math

import torch

__all__ = ["float_sq_norm"]


def _fixed_sq(v: torch.Tensor) -> tuple[int, int]:
    """(integer sum, exponent): ||v||^2 ~ sum * 2^exponent, computed as the module essay says."""
    v = v.detach().reshape(-1)
    n = v.numel()
    if n == 0:
        return 0, 0
    top = float(v.abs().max())
    if top == 0.0:
        return 0, 0
    e = math.frexp(top)[1]                       # top < 2^e, so top^2 < 2^(2e)
    k = 62 - (n - 1).bit_length() - 2 * e        # top^2 2^k < 2^(62 - log2 n)
    x = v.to(torch.float64)
    x.mul_(x).mul_(2.0 ** k)                     # k lies in [-250, 360]: 2^k is a float64
    return int(x.to(torch.int64).sum()), -k


def float_sq_norm(*tensors: torch.Tensor) -> float:
    """||concat(tensors)||^2 in float64, the same bits on every worker and device.

    Raises:
        TypeError: a tensor that is not float32.
    """
    parts = []
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"float_sq_norm takes float32 tensors, got {t.dtype}")
        total, exp = _fixed_sq(t)
        if total:
            parts.append((total, exp))
    if not parts:
        return 0.0
    low = min(exp for _, exp in parts)
    total = sum(value << (exp - low) for value, exp in parts)
    # int * 2^low (exact) or int / 2^-low (Python's int true division rounds correctly).
    return float(total << low) if low >= 0 else total / (1 << -low)
