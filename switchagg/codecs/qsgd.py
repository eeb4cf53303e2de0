"""qsgd: QSGD, stochastic s-level quantization (Alistarh, Grubic, Li, Tomioka, Vojnovic,
NeurIPS 2017).

Each parameter is cut into buckets of `bucket_size` coordinates; a bucket v is sent as its norm
||v||_2 and, per coordinate, a sign and a level l_i in {0..s}: with y_i = s |v_i| / ||v||_2,
l_i = floor(y_i) + Bernoulli(frac(y_i)), decoded as ||v|| sgn(v_i) l_i / s. Unbiased, with
E||Q(v) - v||^2 = (||v||^2 / s^2) sum_i p_i (1 - p_i) <= min(b/s^2, sqrt(b)/s) ||v||^2.

Wire (all-gather, as the IntSGD authors ran it: per-worker norms cannot be added): levels packed at
their real width ceil(log2(s + 1)) bits, one sign bit per coordinate, one fp32 norm per bucket.
`paper_bits` is the paper's Elias-omega count: 32 bits per bucket + for every non-zero coordinate
|omega(gap)| + 1 + |omega(l_i)|, gap_1 = index + 1 within the bucket. The random stream is the
block's own (rank, step, parameter key), so any bucketing gives the same numbers.
"""

from __future__ import annotations

import math

import torch

from switchagg.codecs._base import Block
from switchagg.codecs._wire import GatherCodec, Reader, Writer, block_generator, elias_omega_bits

__all__ = ["QSGD", "qsgd_levels", "qsgd_paper_bits"]


def qsgd_levels(v: torch.Tensor, s: int, bucket_size: int, gen: torch.Generator):
    """(levels int64 (d,), negative mask (d,), norms float32 (chunks,)) of a 1-D tensor."""
    d = v.numel()
    chunks = max(1, -(-d // bucket_size))
    padded = v.new_zeros(chunks * bucket_size)
    padded[:d] = v
    rows = padded.view(chunks, bucket_size)
    norms = torch.linalg.vector_norm(rows, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    y = (rows.abs() * s / safe[:, None]).reshape(-1)[:d]
    floor = torch.floor(y)
    u = torch.rand(d, generator=gen, device=v.device, dtype=torch.float32)
    levels = (floor + (u < (y - floor)).to(y.dtype)).clamp_(max=s).to(torch.int64)
    return levels, v < 0, norms


def qsgd_paper_bits(levels: torch.Tensor, bucket_size: int) -> int:
    """The QSGD paper's Elias-omega bit count of realized levels (per bucket: 32 + gaps, signs
    and levels of the non-zero coordinates)."""
    d = levels.numel()
    chunks = max(1, -(-d // bucket_size))
    lv = levels.new_zeros(chunks * bucket_size)
    lv[:d] = levels
    lv = lv.view(chunks, bucket_size)
    nz = lv > 0
    idx = torch.arange(bucket_size, device=lv.device).expand_as(lv)
    marked = torch.where(nz, idx, torch.full_like(idx, -1))
    prev = torch.cummax(marked, dim=1).values
    prev_excl = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], dim=1)
    gaps = (idx - prev_excl)[nz]
    bits = elias_omega_bits(gaps).sum() + nz.sum() + elias_omega_bits(lv[nz]).sum()
    return 32 * chunks + int(bits)


class QSGD(GatherCodec):
    """QSGD with s levels per bucket of `bucket_size` coordinates (L2 norm), all-gathered.

    Args:
        s: quantization levels (default 2^4 - 1 = 15; qsgd-8bit uses 255).
        bucket_size: coordinates per norm (default 512, as CGX / the paper's bucketed runs).
    """

    unbiased = True

    def __init__(self, *, s: int = 15, bucket_size: int = 512, **common) -> None:
        super().__init__(**common)
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"s={s!r}: QSGD needs an integer number of levels >= 1")
        if not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"bucket_size={bucket_size!r}: expected an int >= 1")
        self.s, self.bucket_size = s, bucket_size
        self.width = max(1, math.ceil(math.log2(s + 1)))

    def _encode_block(self, x: torch.Tensor, block: Block, w: Writer) -> None:
        if x.numel() == 0:
            return
        gen = block_generator(self.seed, self.rank, self.step, block.key, x.device)
        levels, negative, norms = qsgd_levels(x.to(torch.float32), self.s, self.bucket_size, gen)
        w.floats(norms)
        w.codes(levels, self.width)
        w.codes(negative.to(torch.int64), 1)
        self._paper(qsgd_paper_bits(levels, self.bucket_size))

    def _decode_block(self, r: Reader, block: Block, src: int) -> torch.Tensor:
        d = block.numel
        if d == 0:
            return r.data.new_zeros(0, dtype=torch.float32)
        chunks = -(-d // self.bucket_size)
        norms = r.floats(chunks)
        levels = r.codes(d, self.width).to(torch.float32)
        negative = r.codes(d, 1).bool()
        scale = (norms / self.s).repeat_interleave(self.bucket_size)[:d]
        values = scale * levels
        return torch.where(negative, -values, values)
