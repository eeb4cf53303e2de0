"""terngrad: TernGrad, ternary gradients (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017).

Per layer (parameter block) with scaler s >= max|g|: b_k ~ Bernoulli(|g_k| / s), sent as
s sgn(g_k) b_k in s {-1, 0, +1}. Unbiased without clipping, E||C(g) - g||^2 = s ||g||_1 - ||g||^2.
`clip` > 0 is the paper's gradient clipping: g is first clipped to +-clip * sigma (sigma its
standard deviation; the paper uses 2.5), which makes it unbiased for the clipped g only.

Two wires:
- `terngrad` (all-gather, each worker its own s = max|g|): the ternaries packed 2 bits each
  (sign + 1 in {0, 1, 2}, 4 per byte) and one fp32 scaler per layer. `paper_bits` = 2 d + 32 per
  layer.
- `terngrad-switch` (the paper's scaler sharing, summable through the switch): an int8 MAX round
  of each layer's exponent e = frexp(max|g|) gives the shared s = 2^e_max >= every worker's
  max|g| (still unbiased), then an int32 SUM of the ternaries (the randomized rounding of g / s,
  by the project's quantize kernel); decoded as s S / n. `paper_bits` =
  2 d + 8 per layer (the ternaries and the exponent), what a switch with 2-bit lanes would carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from switchagg import kernels
from switchagg.codecs._base import Block, Bucket, IntegerCodec, Max, Sum, host_int8
from switchagg.codecs._wire import GatherCodec, Reader, Writer, block_generator

__all__ = ["TernGrad", "TernGradSwitch", "ternarize"]


def _clipped(g: torch.Tensor, clip: float) -> torch.Tensor:
    if clip <= 0 or g.numel() < 2:
        return g
    bound = clip * g.std()
    return torch.maximum(torch.minimum(g, bound), -bound)


def ternarize(g: torch.Tensor, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """sgn(g) Bernoulli(|g| / s) as int32 in {-1, 0, 1} (s >= max|g|, a 0-d tensor)."""
    u = torch.rand(g.shape, generator=gen, device=g.device, dtype=torch.float32)
    keep = u * s < g.abs()
    return torch.where(keep, torch.sign(g), torch.zeros_like(g)).to(torch.int32)


class TernGrad(GatherCodec):
    """TernGrad with one scaler per layer, all-gathered (2-bit packed ternaries + fp32 scaler).

    Args:
        clip: clip to +-clip * std before ternarizing (0: off, unbiased; the paper: 2.5).
    """

    unbiased = True

    def __init__(self, *, clip: float = 0.0, **common) -> None:
        super().__init__(**common)
        if not clip >= 0:
            raise ValueError(f"clip={clip!r}: expected >= 0 (0 turns clipping off)")
        self.clip = float(clip)

    def _encode_block(self, x: torch.Tensor, block: Block, w: Writer) -> None:
        if x.numel() == 0:
            return
        g = _clipped(x.to(torch.float32), self.clip)
        s = g.abs().max()
        gen = block_generator(self.seed, self.rank, self.step, block.key, x.device)
        t = ternarize(g, torch.where(s > 0, s, torch.ones_like(s)), gen)
        w.floats(s.reshape(1))
        w.codes((t + 1).to(torch.int64), 2)
        self._paper(2 * x.numel() + 32)

    def _decode_block(self, r: Reader, block: Block, src: int) -> torch.Tensor:
        if block.numel == 0:
            return r.data.new_zeros(0, dtype=torch.float32)
        s = r.floats(1)
        return (r.codes(block.numel, 2) - 1).to(torch.float32) * s


@dataclass
class _SharedCtx:
    bucket: Bucket
    q: torch.Tensor
    scales: torch.Tensor   # per coordinate, the shared 2^e_max of its layer
    clipped: int


class TernGradSwitch(IntegerCodec):
    """TernGrad with the scaler shared by an int8 exponent MAX, summed as int32 (the switch).

    With s = 2^e >= |g_k|, sgn(g_k) Bernoulli(|g_k| / s) is exactly the randomized rounding of
    g_k / s in [-1, 1], so the ternaries come from the project's quantize kernel (its Philox
    stream, keyed by the element's offset in the iteration: the same integers on CPU and CUDA).

    Args:
        clip: as `TernGrad`.
    """

    needs = ("max", "sum")
    unbiased = True

    def __init__(self, *, clip: float = 0.0, **common) -> None:
        super().__init__(**common)
        if not clip >= 0:
            raise ValueError(f"clip={clip!r}: expected >= 0 (0 turns clipping off)")
        self.clip = float(clip)

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Max:
        gs = [_clipped(x[b.start:b.stop].to(torch.float32), self.clip) for b in bucket.blocks]
        tops = torch.stack([g.abs().max() if g.numel() else x.new_zeros((), dtype=torch.float32)
                            for g in gs]) if gs else x.new_zeros(0)
        exps = torch.frexp(tops).exponent.clamp(-126, 127)   # 2^e > max|g| >= 2^(e-1)
        exps = torch.where(tops > 0, exps, torch.full_like(exps, -128))
        local = host_int8(exps.to(torch.int8))   # integers only cross to the host

        def ternarize_with(e_max: np.ndarray) -> Sum:
            q = torch.zeros(x.numel(), dtype=torch.int32, device=x.device)
            scales = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
            clipped = 0
            for b, g, e in zip(bucket.blocks, gs, np.asarray(e_max).tolist()):
                if e == -128 or b.numel == 0:
                    continue
                clipped += kernels.quantize(g, math.ldexp(1.0, -e), rounding="random",
                                            seed=self.seed, rank=self.rank, step=self.step,
                                            offset=bucket.offset + b.start, lo=-1, hi=1,
                                            out=q[b.start:b.stop]).clipped
                scales[b.start:b.stop] = math.ldexp(1.0, e)
            with self._lock:
                self.tel.paper_bits += 2 * x.numel() + 8 * len(bucket.blocks)
            return Sum(q, _SharedCtx(bucket, q, scales, clipped))

        return Max(local, ternarize_with)

    def decode(self, reduced, ctx: _SharedCtx, out: torch.Tensor) -> None:
        torch.mul(reduced.to(torch.float32), ctx.scales, out=out)
        out.div_(self.n)
        self._record_ints(ctx.q, reduced, ctx.clipped)
        with self._lock:
            self.tel.scaling = "shared-max-exponent"
