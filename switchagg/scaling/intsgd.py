"""IntSGD's scaling factor alpha (Algorithms 1 and 2): pure float64 math every worker agrees on.

What it owns: the EMA r of squared step lengths and alpha = eta / sqrt(2 n r / d + eps^2), for one
block (Algorithm 1, d = all parameters) or m blocks at once (Algorithm 2, block l with its own d_l).
What it must never do: look at a worker's local gradient or any float another worker computed
differently. alpha must be bit-identical on every worker, or sum(Q_i) / (n alpha) is biased
(the sum would be decoded with a scale some worker did not use), and no float is exchanged to
agree on it.

How it stays bit-identical: its only inputs are the integer sum's exact squared norm (a Python int
from `kernels.int_squared_norm`, the same on every worker because the sum is), the alpha it used
(which it produced), the learning rate, and constants (n, d_l, beta, eps). Everything is IEEE
float64 elementwise arithmetic (+, *, /, sqrt: correctly rounded) in a fixed order: no reductions
whose order depends on a device or a library. alpha is rounded to float32 once, because the quantize
kernel applies it as float32 and decoding must divide by exactly the value that encoded.

The step length. For plain SGD x^{k+1} - x^k = -eta_k g~^k with g~^k = S^k / (n alpha_k), so
||x^{k+1} - x^k||^2 = eta_k^2 ||S^k||^2 / (n alpha_k)^2: the paper's quantity (it includes eta; the
authors' code tracks ||g~||^2 instead, which differs by eta^2: pitfall 3). The scaler tracks the
paper's quantity as if the optimizer were plain SGD (momentum and weight decay applied after the
reduce are not the compressor's business, as in the paper's experiments).

Learning-rate changes. With lr_rescale=True (default), when eta changes from eta_prev to eta, r is
rescaled by (eta / eta_prev)^2 first, i.e. r measures the recent steps as they would be at the
current learning rate. alpha then equals the authors' code's eta-free alpha = 1/sqrt(2 n r_g / d +
(eps/eta)^2), so warm-up and decay do not swing the integers' size; with a constant eta it is exactly
the paper's formula. lr_rescale=False is the literal paper formula (integers grow by eta/eta_prev
after a warm-up step and shrink after a decay until the EMA catches up).

First step (r unknown). `alpha` raises until `observe` has seen one step; the methods take step 0
with SwitchML's heuristic block-exponent scaling (no float exchanged, int8 exponents only; see
`switchagg.codecs.heuristic`) and seed r with that step's exact length: r_1 = ||x^1 - x^0||^2,
the first value itself, not (1 - beta) times it (pitfall 5).
"""

from __future__ import annotations

import numpy as np

__all__ = ["AlphaScaler", "ALPHA_MAX", "ALPHA_MIN"]

#: alpha is capped so that it (and n * alpha) stays a finite float32 even when r -> 0 and eps = 0;
#: at this size every nonzero gradient clips to the budget anyway.
ALPHA_MAX = float(2.0 ** 100)
#: ... and floored so that it never rounds to a float32 zero (decoding divides by it).
ALPHA_MIN = float(2.0 ** -100)


class AlphaScaler:
    """alpha_k for m blocks (m = 1: Algorithm 1).

    Args:
        world_size: n.
        block_sizes: d_l of each block (one entry: the whole model).
        beta: EMA factor of r (default 0.9).
        eps: the eps in alpha = eta / sqrt(2 n r / d + eps^2) (default 1e-8).
        lr_rescale: rescale r when the learning rate changes (see the module essay).
    """

    def __init__(self, world_size: int, block_sizes, *, beta: float = 0.9, eps: float = 1e-8,
                 lr_rescale: bool = True) -> None:
        sizes = np.asarray(block_sizes, dtype=np.float64).reshape(-1)
        if world_size < 1 or sizes.size == 0 or (sizes <= 0).any():
            raise ValueError(f"need world_size >= 1 and positive block sizes, got {world_size}, "
                             f"{block_sizes!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.n = float(world_size)
        self.d = sizes
        self.beta = float(beta)
        self.eps = float(eps)
        self.lr_rescale = bool(lr_rescale)
        self.r: np.ndarray | None = None  # float64 per block, the EMA of squared step lengths
        self.lr_prev: float | None = None

    @property
    def ready(self) -> bool:
        """Whether r is known (a first step has been observed)."""
        return self.r is not None

    def _r_at(self, lr: float) -> np.ndarray:
        if self.lr_rescale and lr != self.lr_prev:
            ratio = lr / self.lr_prev
            return self.r * (ratio * ratio)
        return self.r

    def alpha(self, lr: float) -> np.ndarray:
        """alpha_k per block, as float32 values (held in a float64 array), for learning rate lr.

        Raises:
            RuntimeError: before the first `observe` (r unknown: take a first step another way).
            ValueError: lr is not a positive finite number (alpha is proportional to lr).
        """
        lr = _check_lr(lr)
        if self.r is None:
            raise RuntimeError("alpha is undefined before the first step; take it with the "
                               "heuristic first-step rule and call observe()")
        a = lr / np.sqrt((2.0 * self.n) * self._r_at(lr) / self.d + self.eps * self.eps)
        return np.clip(a, ALPHA_MIN, ALPHA_MAX).astype(np.float32).astype(np.float64)

    def observe(self, step_sq: np.ndarray | float, lr: float) -> None:
        """Feed one step's squared length ||x^{k+1} - x^k||^2 per block (see `step_sq_from_sum`)."""
        lr = _check_lr(lr)
        step_sq = np.asarray(step_sq, dtype=np.float64).reshape(-1)
        if step_sq.shape != self.d.shape:
            raise ValueError(f"step_sq has {step_sq.size} blocks, the scaler {self.d.size}")
        if self.r is None:
            self.r = step_sq.copy()
        else:
            self.r = self.beta * self._r_at(lr) + (1.0 - self.beta) * step_sq
        self.lr_prev = lr

    def step_sq_from_sum(self, sq_norms: list[int], alpha: np.ndarray, lr: float) -> np.ndarray:
        """eta^2 ||S_l||^2 / (n alpha_l)^2 per block, from exact integer squared norms of the sum."""
        sq = np.array([float(v) for v in sq_norms], dtype=np.float64)  # int -> float: correctly rounded
        na = self.n * np.asarray(alpha, dtype=np.float64)
        return (lr * lr) * (sq / (na * na))

    def state_dict(self) -> dict:
        return {"r": None if self.r is None else self.r.tolist(), "lr_prev": self.lr_prev}

    def load_state_dict(self, state: dict) -> None:
        r = state["r"]
        self.r = None if r is None else np.asarray(r, dtype=np.float64)
        if self.r is not None and self.r.shape != self.d.shape:
            raise ValueError(f"state has {self.r.size} blocks, the scaler {self.d.size}")
        self.lr_prev = state["lr_prev"]


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not (lr > 0.0 and np.isfinite(lr)):
        raise ValueError(f"IntSGD needs a positive finite learning rate (alpha is proportional "
                         f"to it), got lr={lr}")
    return lr
