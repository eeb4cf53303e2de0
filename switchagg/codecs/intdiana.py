"""IntDIANA, Algorithm 3 (Mishchenko et al., ICLR 2022): IntSGD on shifted gradients.

Wire: Q_i = Int(alpha_k (g_i - h_i)) as int32 (budget-clipped); nothing else. Each worker keeps its
shift h_i and the global shift h (= the mean of the h_i), updated with the same alpha_k that
encoded:
    h_i += Q_i / alpha_k;   g~ = h + S / (n alpha_k);   h = g~.
Under heterogeneous data g_i -> grad f_i(x*) != 0, so IntSGD's integers alpha g_i grow as alpha
grows, while g_i - h_i -> 0 and IntDIANA's integers stay bounded. Unbiased with random rounding.

The shifts are kept per parameter (the bucket's block keys), so DDP's bucket rebuild does not move
them. Consistency across workers: h changes only by `dequantize(S, n alpha)` (float32 of an exact
float64 quotient of integers and an alpha every worker shares) added elementwise in float32, so
every worker's h is bit-identical, whatever its gradients' device.

alpha tracks the compressed innovation: r is the EMA of eta^2 ||S / (n alpha)||^2 over the whole
model, from the exact integer norms. Step 0: the heuristic step on g_i - h_i = g_i, with the
shifts updated by its per-chunk scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from switchagg import kernels
from switchagg._choices import check_choice
from switchagg.codecs._base import Bucket, IntegerCodec, Payload, Sum
from switchagg.codecs.heuristic import StreamCtx, chunked_sq_norm, decode_chunked, switchml_stream
from switchagg.scaling import AlphaScaler

__all__ = ["IntDIANA"]


@dataclass
class _DianaCtx:
    inner: object          # StreamCtx (first step) or None
    bucket: Bucket
    q: torch.Tensor | None
    clipped: int


class IntDIANA(IntegerCodec):
    """IntDIANA with a global alpha.

    Args:
        rounding: "random" (default, the theory's) or "deterministic".
        beta, eps, lr_rescale: see `AlphaScaler`.
    """

    needs = ("sum", "stream")
    unbiased = True

    def __init__(self, *, rounding: str = "random", beta: float = 0.9, eps: float = 1e-8,
                 lr_rescale: bool = True, **common) -> None:
        super().__init__(**common)
        self.rounding = check_choice("rounding", rounding)
        self.scaler_options = dict(beta=beta, eps=eps, lr_rescale=lr_rescale)
        self.scaler: AlphaScaler | None = None
        self.h_local: dict[int, torch.Tensor] = {}    # h_i per block key (float32, x's device)
        self.h_global: dict[int, torch.Tensor] = {}   # h per block key, identical on every worker
        self.last_alpha: np.ndarray | None = None
        self._alpha: np.ndarray | None = None
        self._int_sq = 0
        self._first_sq: dict[int, float] = {}
        self._seen = 0

    def _begin(self) -> None:
        self._alpha = self.last_alpha = None if self.scaler is None else self.scaler.alpha(self.lr)
        self._int_sq, self._first_sq, self._seen = 0, {}, 0
        if self._alpha is not None:
            al = float(self._alpha[0])
            self._record_scales(al, al, al, "alpha")

    def _end(self) -> None:
        lr = self.lr
        if self.scaler is None:
            self.scaler = AlphaScaler(self.n, [max(self._seen, 1)], **self.scaler_options)
        if self._alpha is None:
            sq = sum(self._first_sq[i] for i in sorted(self._first_sq))
            self.scaler.observe((lr * lr) * sq, lr)
        else:
            self.scaler.observe(self.scaler.step_sq_from_sum([self._int_sq], self._alpha, lr), lr)

    def _shifts(self, x: torch.Tensor, bucket: Bucket) -> None:
        for blk in bucket.blocks:
            h = self.h_local.get(blk.key)
            if h is None:
                self.h_local[blk.key] = torch.zeros(blk.numel, dtype=torch.float32, device=x.device)
                self.h_global[blk.key] = torch.zeros(blk.numel, dtype=torch.float32, device=x.device)
            elif h.numel() != blk.numel:
                raise ValueError(f"intdiana: parameter block {blk.key} has {blk.numel} elements, "
                                 f"{h.numel()} before; the gradient layout changed")

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Payload:
        self._shifts(x, bucket)
        with self._lock:
            self._seen += bucket.numel
        diff = x.to(torch.float32).clone()   # float32 elementwise: g_i - h_i, on x's device
        for blk in bucket.blocks:
            diff[blk.start:blk.stop] -= self.h_local[blk.key]
        if self._alpha is None:
            stream = switchml_stream(self, diff, bucket)
            return type(stream)(stream.exponents, stream.encode, stream.numel,
                                _DianaCtx(stream.ctx, bucket, None, 0))
        al = float(self._alpha[0])
        res = kernels.quantize(diff, al, rounding=self.rounding, seed=self.seed, rank=self.rank,
                               step=self.step, offset=bucket.offset, lo=self.lo, hi=self.hi)
        return Sum(res.values, _DianaCtx(None, bucket, res.values, res.clipped))

    def decode(self, reduced, ctx: _DianaCtx, out: torch.Tensor) -> None:
        bucket = ctx.bucket
        if isinstance(ctx.inner, StreamCtx):
            sums, first = reduced[0], ctx.inner
            q, divisors, k = first.q[:bucket.numel], first.divisors, self.k
            mine = torch.empty(bucket.numel, dtype=torch.float32, device=out.device)
            decode_chunked(q, divisors / self.n, k, mine)
            decode_chunked(sums, divisors, k, out)
            with self._lock:
                self._first_sq[bucket.index] = chunked_sq_norm(sums, divisors, k)
            clipped = first.clipped[0]
        else:
            sums, q = reduced, ctx.q
            al = float(self._alpha[0])
            mine = kernels.dequantize(q, al) if q.numel() else q.to(torch.float32)
            if sums.numel():
                kernels.dequantize(sums, self.n * al, out=out)
            sq = kernels.int_squared_norm(sums) if sums.numel() else 0
            with self._lock:
                self._int_sq += sq
            clipped = ctx.clipped
        for blk in bucket.blocks:   # h_i += Q_i / alpha; h += S / (n alpha); g~ = h
            a, b = blk.start, blk.stop
            self.h_local[blk.key] += mine[a:b]
            self.h_global[blk.key] += out[a:b]
            out[a:b] = self.h_global[blk.key]
        self._record_ints(q, sums, clipped)
        if isinstance(ctx.inner, StreamCtx) and ctx.inner.scales.size:
            s = ctx.inner.scales
            self._record_scales(float(s.min()), float(s.max()), None, "first-step-heuristic")

    def state_dict(self) -> dict:
        return {"h_local": {k: v.clone() for k, v in self.h_local.items()},
                "h_global": {k: v.clone() for k, v in self.h_global.items()},
                "scaler": None if self.scaler is None else dict(self.scaler.state_dict(),
                                                                d=self.scaler.d.tolist())}

    def load_state_dict(self, state: dict) -> None:
        self.h_local = {int(k): v.clone() for k, v in state["h_local"].items()}
        self.h_global = {int(k): v.clone() for k, v in state["h_global"].items()}
        self.scaler = None
        if state["scaler"] is not None:
            scaler = dict(state["scaler"])
            self.scaler = AlphaScaler(self.n, scaler.pop("d"), **self.scaler_options)
            self.scaler.load_state_dict(scaler)
