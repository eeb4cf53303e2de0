"""IntDIANA, Algorithm 3 (Mishchenko et al., ICLR 2022): IntSGD on shifted gradients.

Wire: Q_i = Int(alpha_k (g_i - h_i)) as int32 (budget-clipped); nothing else. Each worker keeps its
shift h_i and the global shift h (= the mean of the h_i), updated with the same alpha_k that
encoded:
    h_i += Q_i / alpha_k;   g~ = h + S / (n alpha_k);   h = g~.
Under heterogeneous data g_i -> grad f_i(x*) != 0, so IntSGD's integers alpha g_i grow as alpha
grows, while g_i - h_i -> 0 and IntDIANA's integers stay bounded. Unbiased with random rounding.
With the logistic-regression task's L-SVRG estimator (`--opt vr=True`) this is the paper's
VR-IntDIANA.

The shifts are kept per parameter (the bucket's block keys), so DDP's bucket rebuild does not move
them. Consistency across workers: h changes only by `dequantize(S, n alpha)` (float32 of an exact
float64 quotient of integers and an alpha every worker shares) added elementwise in float32, so
every worker's h is bit-identical, whatever its gradients' device.

alpha follows the full step, as the authors' code does (`alpha_from="step"`, the default): r is the
EMA of ||x^{k+1} - x^k||^2 = eta^2 ||g~^k||^2 = eta^2 ||h^{k+1}||^2. The full step includes h, a
float vector, so its length is not an integer norm; but h is bit-identical on every worker, and
`scaling.float_sq_norm` turns it into the same float64 everywhere (integer arithmetic on the
floats' bits, parameter by parameter in key order, never a device's float reduction). The other
rule, `alpha_from="innovation"`, tracks only the compressed innovation eta^2 ||S / (n alpha)||^2
(exact integer norms); that innovation also carries the previous step's rounding error, so it is
not the step the theory's alpha is built on. (On a5a with full local gradients the two rules end
within about 10% of each other's distance to x*.)

Step 0 (r unknown) follows `first_step` (`codecs._first_step`): SwitchML's heuristic step on
g_i - h_i = g_i (default), a fixed alpha_0, or an uncompressed fp32 step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from switchagg import kernels
from switchagg._choices import check_choice
from switchagg.codecs._base import Bucket, IntegerCodec, Payload, Sum
from switchagg.codecs._first_step import (FIRST_STEP_DEFAULT, FIXED_ALPHA, SCALING,
                                          check_first_step)
from switchagg.codecs.heuristic import StreamCtx, decode_chunked, switchml_stream
from switchagg.scaling import AlphaScaler
from switchagg.scaling.exact_norm import float_sq_norm

__all__ = ["IntDIANA"]


@dataclass
class _DianaCtx:
    inner: object          # StreamCtx (first step, switchml) or None
    bucket: Bucket
    q: torch.Tensor | None  # int32 Q_i, or the float g_i - h_i of an uncompressed first step
    clipped: int


class IntDIANA(IntegerCodec):
    """IntDIANA with a global alpha.

    Args:
        rounding: "random" (default, the theory's) or "deterministic".
        beta, eps, lr_rescale: see `AlphaScaler`.
        alpha_from: "step" (the full step ||x^{k+1} - x^k||, the authors') or "innovation".
        first_step: "switchml", "fixed-alpha" or "uncompressed" (see `codecs._first_step`).
        alpha0: the fixed first-step alpha (default 100, the authors' distributed code).
    """

    needs = ("sum", "stream")
    unbiased = True

    def __init__(self, *, rounding: str = "random", beta: float = 0.9, eps: float = 1e-8,
                 lr_rescale: bool = True, alpha_from: str = "step",
                 first_step: str = FIRST_STEP_DEFAULT, alpha0: float = FIXED_ALPHA,
                 **common) -> None:
        super().__init__(**common)
        self.rounding = check_choice("rounding", rounding)
        self.alpha_from = check_choice("alpha_from", alpha_from)
        self.first_step = check_first_step(first_step, alpha0)
        self.alpha0 = float(alpha0)
        self.scaler_options = dict(beta=beta, eps=eps, lr_rescale=lr_rescale)
        self.scaler: AlphaScaler | None = None
        self.h_local: dict[int, torch.Tensor] = {}    # h_i per block key (float32, x's device)
        self.h_global: dict[int, torch.Tensor] = {}   # h per block key, identical on every worker
        self.last_alpha: np.ndarray | None = None
        self._alpha: np.ndarray | None = None
        self._int_sq = 0
        self._seen = 0

    @property
    def _first(self) -> bool:
        return self.scaler is None

    def _begin(self) -> None:
        self._int_sq, self._seen = 0, 0
        if self._first:
            fixed = self.first_step == "fixed-alpha"
            self._alpha = np.array([np.float32(self.alpha0)], np.float64) if fixed else None
        else:
            self._alpha = self.scaler.alpha(self.lr)
        self.last_alpha = self._alpha
        if self._alpha is not None:
            al = float(self._alpha[0])
            self._record_scales(al, al, al, SCALING["fixed-alpha"] if self._first else "alpha")

    def _end(self) -> None:
        lr = self.lr
        if self.alpha_from == "step" or self._alpha is None:
            # the full step eta^2 ||h^{k+1}||^2, in key order, the same float64 everywhere (at
            # step 0 without an alpha too: h^1 = g~^0)
            step_sq = (lr * lr) * float_sq_norm(*(self.h_global[k] for k in sorted(self.h_global)))
        else:
            step_sq = self.scaler_step_sq(self._int_sq, lr)
        if self.scaler is None:
            self.scaler = AlphaScaler(self.n, [max(self._seen, 1)], **self.scaler_options)
        self.scaler.observe(step_sq, lr)

    def scaler_step_sq(self, int_sq: int, lr: float) -> float:
        """eta^2 ||S / (n alpha)||^2 from the exact integer norm (the innovation rule)."""
        na = self.n * float(self._alpha[0])
        return (lr * lr) * (float(int_sq) / (na * na))

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
        if self._alpha is None and self.first_step == "uncompressed":
            return Sum(diff, _DianaCtx(None, bucket, diff, 0))
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
        q = ctx.q
        if isinstance(ctx.inner, StreamCtx):
            sums, first = reduced[0], ctx.inner
            q, divisors, k = first.q[:bucket.numel], first.divisors, self.k
            mine = torch.empty(bucket.numel, dtype=torch.float32, device=out.device)
            decode_chunked(q, divisors / self.n, k, mine)
            decode_chunked(sums, divisors, k, out)
            clipped = first.clipped[0]
        elif q is not None and q.dtype == torch.float32:   # the uncompressed first step
            sums, mine = reduced, q
            out.copy_(sums.to(torch.float32) / self.n)
            clipped = 0
        else:
            sums = reduced
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
        if q.dtype == torch.int32:
            self._record_ints(q, sums, clipped)
        else:
            with self._lock:
                self.tel.scaling = SCALING["uncompressed"]
        if isinstance(ctx.inner, StreamCtx) and ctx.inner.scales.size:
            s = ctx.inner.scales
            self._record_scales(float(s.min()), float(s.max()), None, SCALING["switchml"])

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
