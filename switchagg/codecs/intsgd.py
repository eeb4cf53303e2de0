"""IntSGD, Algorithms 1 and 2 (Mishchenko, Wang, Kovalev, Richtarik, ICLR 2022).

Wire: Q_i = Int(alpha_k g_i) as int32, clipped to the budget; nothing else (alpha is computed by
every worker from the integer sums it already holds: `switchagg.scaling.AlphaScaler`).
Decode: S / (n alpha_k). Randomized rounding is unbiased (variance <= 1/4 per coordinate, the case
the theory covers); deterministic rounding (half to even) is biased.

Algorithm 1 (`blocks="global"`) keeps one r for the whole model: every bucket of iteration k uses
alpha_k, the exact integer squared norms of all its sums add up (Python ints, order-free) to
||S^k||^2, and r is updated once per iteration, so it does not matter how the model is cut into
buckets. Algorithm 2 (`blocks="tensor"`) keeps one r and alpha per parameter, each with its own
size d_l, keyed by the bucket's block keys (stable across DDP's bucket rebuild).

Step 0 (r unknown) follows `first_step` (`codecs._first_step`). By default it is SwitchML's
heuristic step (`heuristic.switchml_stream`, int8 exponents only, so nothing float is exchanged);
its exact squared length seeds r. Its float observations are kept by bucket position (or block
key) and summed in that order, so every rank folds the same number. "fixed-alpha" takes step 0 as
any other step with alpha_0 (default 100, the authors' distributed code); "uncompressed" sends
the fp32 gradient (the paper), whose decoded length (`scaling.float_sq_norm`, the same float64 on
every worker) seeds r.
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
from switchagg.codecs.heuristic import StreamCtx, chunked_sq_norm, decode_chunked, switchml_stream
from switchagg.scaling import AlphaScaler
from switchagg.scaling.exact_norm import float_sq_norm

__all__ = ["IntSGD"]


@dataclass
class _AlphaCtx:
    bucket: Bucket
    q: torch.Tensor
    spans: list[tuple[int | None, int, int, float]]   # (block key or None, start, stop, alpha)
    clipped: int


@dataclass
class _FloatCtx:
    bucket: Bucket


class IntSGD(IntegerCodec):
    """IntSGD with a global alpha (blocks="global") or one alpha per tensor (blocks="tensor").

    Args:
        rounding: "random" or "deterministic".
        blocks: "global" (Algorithm 1) or "tensor" (Algorithm 2).
        beta, eps, lr_rescale: see `AlphaScaler`.
        first_step: "switchml", "fixed-alpha" or "uncompressed" (see `codecs._first_step`).
        alpha0: the fixed first-step alpha (default 100, the authors' distributed code).
    """

    needs = ("sum", "stream")
    unbiased = True

    def __init__(self, *, rounding: str = "random", blocks: str = "global", beta: float = 0.9,
                 eps: float = 1e-8, lr_rescale: bool = True, first_step: str = FIRST_STEP_DEFAULT,
                 alpha0: float = FIXED_ALPHA, **common) -> None:
        super().__init__(**common)
        self.first_step = check_first_step(first_step, alpha0)
        self.alpha0 = float(np.float32(alpha0))
        self.rounding = check_choice("rounding", rounding)
        self.blocks = check_choice("blocks", blocks)
        self.scaler_options = dict(beta=beta, eps=eps, lr_rescale=lr_rescale)
        self.scaler: AlphaScaler | None = None
        self.sizes: dict[int, int] = {}     # block key -> elements (tensor mode), or {0: d}
        self.last_alpha: np.ndarray | None = None
        self._alpha: np.ndarray | None = None
        self._int_sq: dict[int, int] = {}           # per block key (global mode: key 0)
        self._first_sq: dict[int, float] = {}       # step 0: by bucket index or block key
        self._seen = 0
        self._fixed = False

    # -- iteration ------------------------------------------------------------------------------

    def _begin(self) -> None:
        self._fixed = self.scaler is None and self.first_step == "fixed-alpha"
        self._alpha = None if self.scaler is None else self.scaler.alpha(self.lr)
        if self._fixed:
            self._alpha = np.array([self.alpha0])   # one value for every block of step 0
        self.last_alpha = self._alpha
        self._int_sq, self._first_sq, self._seen = {}, {}, 0
        if self._alpha is not None:
            a = self._alpha
            self._record_scales(float(a.min()), float(a.max()),
                                float(a[0]) if a.size == 1 else None,
                                SCALING["fixed-alpha"] if self._fixed else "alpha")

    def _end(self) -> None:
        lr = self.lr
        if self.scaler is not None and self.blocks == "global" and self._seen != self.sizes[0]:
            raise ValueError(f"{self.name}: the gradient has {self._seen} elements, "
                             f"{self.sizes[0]} before; the layout changed between steps")
        if self.scaler is None:
            if self.blocks == "global":
                self.sizes = {0: self._seen}
            sizes = [max(self.sizes[key], 1) for key in sorted(self.sizes)]
            self.scaler = AlphaScaler(self.n, sizes, **self.scaler_options)
        keys = sorted(self.sizes)
        if self._fixed:           # step 0 with alpha_0: its exact integer norms, as later
            ints = [self._int_sq.get(key, 0) for key in keys]
            alpha = np.full(len(keys), self.alpha0)
            self.scaler.observe(self.scaler.step_sq_from_sum(ints, alpha, lr), lr)
        elif self._alpha is None:  # the first step: float lengths, summed in a fixed order
            if self.blocks == "global":
                step_sq = [sum(self._first_sq[i] for i in sorted(self._first_sq))]
            else:
                step_sq = [self._first_sq.get(key, 0.0) for key in keys]
            self.scaler.observe((lr * lr) * np.array(step_sq, dtype=np.float64), lr)
        else:
            ints = [self._int_sq.get(key, 0) for key in keys]
            self.scaler.observe(self.scaler.step_sq_from_sum(ints, self._alpha, lr), lr)

    # -- one bucket -----------------------------------------------------------------------------

    def _check_blocks(self, bucket: Bucket) -> None:
        with self._lock:
            self._seen += bucket.numel
            if self.blocks != "tensor":
                return
            for blk in bucket.blocks:
                known = self.sizes.get(blk.key)
                if known is None:
                    if self.scaler is not None:
                        raise ValueError(f"{self.name}: a parameter of {blk.numel} elements "
                                         f"appeared after the first step; blocks='tensor' "
                                         f"needs a fixed parameter set")
                    self.sizes[blk.key] = blk.numel
                elif known != blk.numel:
                    raise ValueError(f"{self.name}: parameter block {blk.key} has {blk.numel} "
                                     f"elements, {known} before; the gradient layout changed")

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Payload:
        self._check_blocks(bucket)
        if self._alpha is None and self.first_step == "uncompressed":
            return Sum(x.to(torch.float32).clone(), _FloatCtx(bucket))
        if self._alpha is None:
            return switchml_stream(self, x, bucket)
        q = torch.empty(x.numel(), dtype=torch.int32, device=x.device)
        spans = self._spans(bucket)
        clipped = 0
        for key, a, b, alpha in spans:
            if b > a:
                clipped += kernels.quantize(x[a:b], alpha, rounding=self.rounding, seed=self.seed,
                                            rank=self.rank, step=self.step, offset=bucket.offset + a,
                                            lo=self.lo, hi=self.hi, out=q[a:b]).clipped
        return Sum(q, _AlphaCtx(bucket, q, spans, clipped))

    def _spans(self, bucket: Bucket) -> list[tuple[int | None, int, int, float]]:
        if self._fixed and self.blocks == "global":
            return [(0, 0, bucket.numel, self.alpha0)]
        if self._fixed:
            return [(b.key, b.start, b.stop, self.alpha0) for b in bucket.blocks]
        if self.blocks == "global":
            return [(0, 0, bucket.numel, float(self._alpha[0]))]
        keys = sorted(self.sizes)
        index = {key: i for i, key in enumerate(keys)}
        return [(b.key, b.start, b.stop, float(self._alpha[index[b.key]])) for b in bucket.blocks]

    def decode(self, reduced, ctx, out: torch.Tensor) -> None:
        if isinstance(ctx, StreamCtx):
            self._decode_first(reduced[0], ctx, out)
            return
        if isinstance(ctx, _FloatCtx):
            self._decode_uncompressed(reduced, ctx.bucket, out)
            return
        sums = reduced
        norms = {}
        for key, a, b, alpha in ctx.spans:
            if b > a:
                kernels.dequantize(sums[a:b], self.n * alpha, out=out[a:b])
                norms[key] = kernels.int_squared_norm(sums[a:b])
        with self._lock:
            for key, sq in norms.items():
                self._int_sq[key] = self._int_sq.get(key, 0) + sq
        self._record_ints(ctx.q, sums, ctx.clipped)

    def _decode_uncompressed(self, sums, bucket: Bucket, out: torch.Tensor) -> None:
        out.copy_(sums.to(torch.float32) / self.n)
        if self.blocks == "global":
            lengths = {bucket.index: float_sq_norm(out)}
        else:
            lengths = {b.key: float_sq_norm(out[b.start:b.stop]) for b in bucket.blocks}
        with self._lock:
            self._first_sq.update(lengths)
            self.tel.scaling = SCALING["uncompressed"]

    def _decode_first(self, sums, ctx: StreamCtx, out: torch.Tensor) -> None:
        divisors, k = ctx.divisors, self.k
        decode_chunked(sums, divisors, k, out)
        bucket = ctx.bucket
        if self.blocks == "global":
            lengths = {bucket.index: chunked_sq_norm(sums, divisors, k)}
        else:
            lengths = {b.key: chunked_sq_norm(sums, divisors, k, b.start, b.stop)
                       for b in bucket.blocks}
        with self._lock:
            self._first_sq.update(lengths)
        self._record_ints(ctx.q[:bucket.numel], sums, ctx.clipped[0])
        if ctx.scales.size:
            self._record_scales(float(ctx.scales.min()), float(ctx.scales.max()), None,
                                SCALING["switchml"])

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"sizes": dict(self.sizes),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sizes = {int(k): int(v) for k, v in state["sizes"].items()}
        self.scaler = None
        if state["scaler"] is not None:
            sizes = [max(self.sizes[key], 1) for key in sorted(self.sizes)]
            self.scaler = AlphaScaler(self.n, sizes, **self.scaler_options)
            self.scaler.load_state_dict(state["scaler"])
