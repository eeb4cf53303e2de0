"""IntSGD, Algorithms 1 and 2 (Mishchenko et al., ICLR 2022; intsgd.md §1-2).

Wire: Q_i = Int(alpha_k g_i) as int32, clipped to the budget; nothing else (alpha is computed by
every worker from the integer sums it already holds: `switchagg.scaling.AlphaScaler`).
Decode: S / (n alpha_k). Randomized rounding is unbiased (variance <= 1/4 per coordinate, the case
the theory covers); deterministic rounding (half to even) is biased.

Algorithm 2 (adaptive block) is the same code with one alpha and one r per block (per gradient
tensor), each with its own size d_l (pitfall 14): `blocks="tensor"`. With one block it is exactly
Algorithm 1. Step 0 (r unknown) is SwitchML's heuristic step (`heuristic.heuristic_step`); its exact
squared length seeds r.
"""

from __future__ import annotations

import numpy as np

from switchagg import kernels
from switchagg._methods._base import IntegerMethod, Layout
from switchagg._methods.heuristic import chunked_sq_norm, decode_chunked, heuristic_step
from switchagg.scaling import AlphaScaler
from switchagg.telemetry import StepTelemetry

__all__ = ["IntSGD"]


class IntSGD(IntegerMethod):
    """IntSGD with a global alpha (blocks="global") or one alpha per tensor (blocks="tensor").

    Args:
        rounding: "random" or "deterministic".
        blocks: "global" (Algorithm 1) or "tensor" (Algorithm 2).
        beta, eps, lr_rescale: see `AlphaScaler`.
    """

    name = "intsgd"

    def __init__(self, collective, *, rounding: str = "random", blocks: str = "global",
                 beta: float = 0.9, eps: float = 1e-8, lr_rescale: bool = True, **common) -> None:
        super().__init__(collective, **common)
        if rounding not in ("random", "deterministic"):
            raise ValueError(f"rounding must be 'random' or 'deterministic', got {rounding!r}")
        if blocks not in ("global", "tensor"):
            raise ValueError(f"blocks must be 'global' or 'tensor', got {blocks!r}")
        self.rounding, self.blocks = rounding, blocks
        self.scaler_options = dict(beta=beta, eps=eps, lr_rescale=lr_rescale)
        self.scaler: AlphaScaler | None = None
        self._bounds: list[int] | None = None
        self.last_alpha: np.ndarray | None = None

    def _setup(self, layout: Layout) -> None:
        bounds = layout.offsets if self.blocks == "tensor" else [0, layout.numel]
        if self._bounds is None:
            sizes = np.maximum(np.diff(bounds), 1)  # an empty tensor gets a harmless block
            self._bounds = list(bounds)
            self.scaler = AlphaScaler(self.n, sizes, **self.scaler_options)
        elif list(bounds) != self._bounds:
            raise ValueError(f"{self.name}: the gradient layout changed between steps "
                             f"(block bounds {self._bounds} -> {list(bounds)})")

    def _reduce_flat(self, x: np.ndarray, layout: Layout, step: int, lr: float,
                     tel: StepTelemetry) -> np.ndarray:
        self._setup(layout)
        spans = list(zip(self._bounds[:-1], self._bounds[1:]))
        if not self.scaler.ready:
            tel.scaling = "first-step-heuristic"
            _, sums, divisors = heuristic_step(self, x, step, tel)
            with self._timed("t_decode"):
                k = self.collective.k
                sq = [chunked_sq_norm(sums, divisors, k, a, b) for a, b in spans]
                self.scaler.observe((lr * lr) * np.array(sq, dtype=np.float64), lr)
                return decode_chunked(sums, divisors, k)

        alpha = self.scaler.alpha(lr)
        self.last_alpha = alpha
        tel.scaling = "alpha"
        tel.alpha_min, tel.alpha_max = float(alpha.min()), float(alpha.max())
        tel.alpha = float(alpha[0]) if alpha.size == 1 else None
        q = np.empty(x.size, np.int32)
        clipped = 0
        for (a, b), al in zip(spans, alpha):
            if b == a:
                continue
            clipped += self._quantize(x[a:b], al, rounding=self.rounding, step=step, offset=a,
                                      out=q[a:b])[1]
        sums = self._sum(q)
        self._record(tel, q, sums, clipped)
        with self._timed("t_decode"):
            out = np.empty(x.size, np.float32)
            sq = []
            for (a, b), al in zip(spans, alpha):
                if b > a:
                    kernels.dequantize(sums[a:b], self.n * al, out=out[a:b])
                sq.append(kernels.int_squared_norm(sums[a:b]) if b > a else 0)
            self.scaler.observe(self.scaler.step_sq_from_sum(sq, alpha, lr), lr)
        return out

    def state_dict(self) -> dict:
        return {"bounds": self._bounds,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._bounds = state["bounds"]
        if state["scaler"] is None:
            self.scaler = None
            return
        self.scaler = AlphaScaler(self.n, np.maximum(np.diff(self._bounds), 1), **self.scaler_options)
        self.scaler.load_state_dict(state["scaler"])
