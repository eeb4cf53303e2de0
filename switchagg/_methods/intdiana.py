"""IntDIANA, Algorithm 3 (Mishchenko et al.; intsgd.md §2.2): IntSGD on shifted gradients.

Wire: Q_i = Int(alpha_k (g_i - h_i)) as int32 (budget-clipped); nothing else. Each worker keeps its
shift h_i and the global shift h (= the mean of the h_i), updated with the same alpha_k that
encoded (pitfall 13):
    h_i += Q_i / alpha_k;   g~ = h + S / (n alpha_k);   h = g~.
Under heterogeneous data g_i -> grad f_i(x*) != 0, so IntSGD's integers alpha g_i grow as alpha
grows, while g_i - h_i -> 0 and IntDIANA's integers stay bounded. Unbiased with random rounding.

Consistency of h across workers: h changes only by `dequantize(S, n alpha)` (float32 of an exact
float64 quotient of integers and an alpha every worker shares) added elementwise in float32, so
every worker's h is bit-identical, whatever its gradients' device.

alpha tracks the compressed innovation: r is the EMA of eta^2 ||S / (n alpha)||^2, the part of
the step the integers carry, from the exact integer norm (the step eta g~ also holds h, a float
vector whose norm is a device-dependent reduction). This scales the integers to the quantity
actually rounded, g_i - h_i, which is what keeps them bounded. Step 0: the heuristic step on
g_i - h_i = g_i, with the shifts updated by its per-chunk scales.
"""

from __future__ import annotations

import numpy as np

from switchagg import kernels
from switchagg._methods._base import IntegerMethod, Layout
from switchagg._methods.heuristic import chunked_sq_norm, decode_chunked, heuristic_step
from switchagg.scaling import AlphaScaler
from switchagg.telemetry import StepTelemetry

__all__ = ["IntDIANA"]


class IntDIANA(IntegerMethod):
    """IntDIANA with a global alpha.

    Args:
        rounding: "random" (default, the theory's) or "deterministic".
        beta, eps, lr_rescale: see `AlphaScaler`.
    """

    name = "intdiana"

    def __init__(self, collective, *, rounding: str = "random", beta: float = 0.9,
                 eps: float = 1e-8, lr_rescale: bool = True, **common) -> None:
        super().__init__(collective, **common)
        if rounding not in ("random", "deterministic"):
            raise ValueError(f"rounding must be 'random' or 'deterministic', got {rounding!r}")
        self.rounding = rounding
        self.scaler_options = dict(beta=beta, eps=eps, lr_rescale=lr_rescale)
        self.scaler: AlphaScaler | None = None
        self.h_local: np.ndarray | None = None   # h_i, this worker's shift (float32)
        self.h_global: np.ndarray | None = None  # h, identical on every worker (float32)
        self.last_alpha: np.ndarray | None = None

    def _reduce_flat(self, x: np.ndarray, layout: Layout, step: int, lr: float,
                     tel: StepTelemetry) -> np.ndarray:
        d, k = x.size, self.collective.k
        if self.h_local is None:
            self.h_local = np.zeros(d, np.float32)
            self.h_global = np.zeros(d, np.float32)
            self.scaler = AlphaScaler(self.n, [max(d, 1)], **self.scaler_options)
        elif self.h_local.size != d:
            raise ValueError(f"intdiana: gradient size changed from {self.h_local.size} to {d}")
        diff = x - self.h_local  # float32, elementwise

        if not self.scaler.ready:
            tel.scaling = "first-step-heuristic"
            q, sums, divisors = heuristic_step(self, diff, step, tel)
            with self._timed("t_decode"):
                self.h_local += decode_chunked(q, divisors / self.n, k)
                self.h_global += decode_chunked(sums, divisors, k)
                sq = chunked_sq_norm(sums, divisors, k)
                self.scaler.observe((lr * lr) * sq, lr)
            return self.h_global.copy()

        alpha = self.last_alpha = self.scaler.alpha(lr)
        al = float(alpha[0])
        tel.scaling, tel.alpha, tel.alpha_min, tel.alpha_max = "alpha", al, al, al
        q, clipped = self._quantize(diff, al, rounding=self.rounding, step=step)
        sums = self._sum(q)
        self._record(tel, q, sums, clipped)
        with self._timed("t_decode"):
            if d:
                kernels.dequantize_add(q, al, self.h_local)
                kernels.dequantize_add(sums, self.n * al, self.h_global)
            sq = kernels.int_squared_norm(sums) if d else 0
            self.scaler.observe(self.scaler.step_sq_from_sum([sq], alpha, lr), lr)
        return self.h_global.copy()

    def state_dict(self) -> dict:
        return {"h_local": None if self.h_local is None else self.h_local.copy(),
                "h_global": None if self.h_global is None else self.h_global.copy(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["h_local"] is None:
            self.h_local = self.h_global = self.scaler = None
            return
        self.h_local = np.array(state["h_local"], dtype=np.float32)
        self.h_global = np.array(state["h_global"], dtype=np.float32)
        self.scaler = AlphaScaler(self.n, [max(self.h_local.size, 1)], **self.scaler_options)
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
