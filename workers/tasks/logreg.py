"""`logreg`: L2-regularized logistic regression, the convex problem of the IntSGD paper.

What it owns: the data (scikit-learn's bundled breast-cancer set by default, or a LIBSVM file such
as a5a given by path), the objective, its optimum x* and the distance-to-optimum report. What it
must never do: shuffle the data before sharding (the paper's workers hold contiguous, heterogeneous
chunks: "split according to its original indices into n folds").

How it works: rows are L2-normalized (the paper's preprocessing), labels are +-1, and worker i holds
a contiguous chunk A_i. The objective the workers jointly minimize is

    f(x) = 1/n sum_i f_i(x),  f_i(x) = mean_{j in chunk i} log(1 + exp(-b_j a_j^T x)) + lam/2 ||x||^2

(the mean of local means, which is what averaging local gradients optimizes, so x* is exactly the
point the methods converge to even when chunk sizes differ by one). x* is computed in float64 by
Newton's method (d <= 2000; L-BFGS above) until ||grad f|| < 1e-12. The default step is 1/L with
L = lam + lambda_max(1/n sum_i A_i^T A_i / (4 N_i)), and by default each worker uses its full local
gradient (batch_size 0), so SGD is gradient descent and f - f* goes to zero linearly; a positive
batch size gives stochastic gradients. Evaluation reports f(x), f(x) - f*, ||x - x*||^2 and the
training accuracy. lam defaults to 5e-4 (the paper's value for a5a).

Variance reduction (`--opt vr=True`): the paper's convex runs use L-SVRG's estimator with
mini-batches (its "VR-IntDIANA" is IntDIANA fed with it: `--methods intdiana`). Worker i keeps a
reference point w_i and its full local gradient u_i = grad f_i(w_i); each step it sends
    g_i = grad f_i(x; xi) - grad f_i(w_i; xi) + u_i
(as the gradient of the batch loss plus the linear term <u_i - grad f_i(w_i; xi), x>, so DDP and
every method see it as an ordinary gradient; the reported loss is the batch loss), and afterwards,
with probability p (one coin per step, the same on every worker: seeded by the step number), sets
w_i = x and recomputes u_i. Defaults as the authors' a5a runs: mini-batches of N / 240 (N/(20 n) at
their n = 12), p = batch / (N / n), and lr = 1 / (2 (L + 27/16 L_b)) with L_b = 1/4 + lam, the
smoothness of one normalized row (their step size at n = 1, a safe bound for every n). Without vr,
a positive batch size gives plain stochastic gradients, which stall at a noise ball.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from switchagg.workers.data import contiguous_bounds, derive_seed, steps_per_epoch
from switchagg.workers.models import LinearModel
from switchagg.workers.tasks.base import ArrayShard, Preset, Task

__all__ = ["LogisticRegression", "load_logreg_data", "logistic_optimum"]


def load_logreg_data(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows-normalized features (float64) and +-1 labels.

    Args:
        path: a LIBSVM-format file, or None for scikit-learn's breast-cancer set (standardized
            features plus a constant column for the intercept).
    """
    if path is None:
        from sklearn.datasets import load_breast_cancer
        a, b = load_breast_cancer(return_X_y=True)
        a = (a - a.mean(0)) / a.std(0)
        a = np.hstack([a, np.ones((len(a), 1))])
    else:
        from sklearn.datasets import load_svmlight_file
        a_sparse, b = load_svmlight_file(path)
        a = np.asarray(a_sparse.todense(), dtype=np.float64)
    classes = np.unique(b)
    if len(classes) != 2:
        raise ValueError(f"logistic regression needs two classes, found {classes[:10]} in "
                         f"{path or 'breast_cancer'}")
    b = np.where(b == classes[1], 1.0, -1.0)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-300), b


def _objective(x: np.ndarray, chunks: list[tuple[np.ndarray, np.ndarray]], lam: float):
    """f, grad f, Hessian-vector builder for the mean of local means (float64)."""
    f = 0.5 * lam * x @ x
    g = lam * x
    weights = []
    for a, b in chunks:
        z = -b * (a @ x)
        f += np.logaddexp(0.0, z).mean() / len(chunks)
        s = 1.0 / (1.0 + np.exp(-z))                       # sigmoid(z)
        g += a.T @ (-b * s) / (len(a) * len(chunks))
        weights.append(s * (1 - s) / (len(a) * len(chunks)))
    return f, g, weights


def logistic_optimum(chunks: list[tuple[np.ndarray, np.ndarray]], lam: float,
                     tol: float = 1e-12, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """x* and f* of the sharded objective, to ||grad|| < tol, in float64.

    Raises:
        RuntimeError: if the solver does not reach `tol` (ill-posed data or lam too small).
    """
    d = chunks[0][0].shape[1]
    x = np.zeros(d)
    if d <= 2000:
        for _ in range(max_iter):
            f, g, weights = _objective(x, chunks, lam)
            if np.linalg.norm(g) < tol:
                return x, float(f)
            h = lam * np.eye(d)
            for (a, _), w in zip(chunks, weights):
                h += (a * w[:, None]).T @ a
            x = x - np.linalg.solve(h, g)   # f is self-concordant-like here; full steps converge
        f, g, _ = _objective(x, chunks, lam)
    else:
        from scipy.optimize import minimize
        res = minimize(lambda v: _objective(v, chunks, lam)[:2], x, jac=True, method="L-BFGS-B",
                       options={"gtol": tol, "ftol": 0, "maxiter": 100 * max_iter})
        x = res.x
        f, g, _ = _objective(x, chunks, lam)
    if np.linalg.norm(g) >= 1e3 * tol:
        raise RuntimeError(f"x* not found: ||grad f|| = {np.linalg.norm(g):.3e} after {max_iter} "
                           "iterations; increase lam")
    return x, float(f)


class LogisticRegression(Task):
    """L2-regularized logistic regression on contiguous, heterogeneous shards.

    Options:
        lam: the L2 factor (default 5e-4).
        vr: L-SVRG's variance-reduced estimator (default False; see the module notes).
        vr_p: its refresh probability (default 0: batch / (N / n), the paper's).
    """

    name = "logreg"
    metric = "suboptimality"
    higher_is_better = False
    option_defaults = {"lam": 5e-4, "vr": False, "vr_p": 0.0}

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        self.lam = float(self.options["lam"])
        self.a, self.b = load_logreg_data(data)
        smooth = float(np.linalg.eigvalsh(self.a.T @ self.a / (4 * len(self.a)))[-1]) + self.lam
        self.vr = bool(self.options["vr"])
        self.vr_p = float(self.options["vr_p"])
        if not 0.0 <= self.vr_p <= 1.0:
            raise ValueError(f"logreg: vr_p must lie in [0, 1] (0: the paper's), got {self.vr_p}")
        if self.vr:
            # The authors' a5a setting: mini-batches of N/(20 n) at n = 12, their step size.
            batch = max(1, len(self.a) // 240)
            self.preset = Preset(epochs=100, batch_size=batch,
                                 lr=1.0 / (2 * (smooth + 27 / 16 * (0.25 + self.lam))),
                                 eval_every=5)
        else:
            # Full local gradients and step 1/L: plain gradient descent for sgd, so f - f* -> 0.
            self.preset = Preset(epochs=300, batch_size=0, lr=1.0 / smooth, eval_every=5)
        self._world = 0
        self._x_star: np.ndarray | None = None
        self._ref: dict[str, Any] | None = None     # L-SVRG: w_i, u_i, p, the step count

    def _chunks(self, world_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.a[s:e], self.b[s:e]) for s, e in contiguous_bounds(len(self.a), world_size)]

    def _prepare(self, world_size: int) -> None:
        if self._world != world_size:
            self._x_star, self._f_star = logistic_optimum(self._chunks(world_size), self.lam)
            self._world = world_size

    def build_model(self) -> nn.Module:
        return LinearModel(self.a.shape[1]).to(self.device)

    def shard(self, rank: int, world_size: int, batch_size: int) -> ArrayShard:
        self._prepare(world_size)
        start, stop = contiguous_bounds(len(self.a), world_size)[rank]
        x = torch.tensor(self.a[start:stop], dtype=torch.float32, device=self.device)
        y = torch.tensor(self.b[start:stop], dtype=torch.float32, device=self.device)
        if self.vr:
            if batch_size <= 0:
                raise ValueError("logreg: vr=True needs mini-batches (a positive --batch-size)")
            p = self.vr_p or min(1.0, batch_size / (len(self.a) / world_size))
            self._ref = {"a": x, "b": y, "w": None, "u": None, "p": p, "k": 0}
        if batch_size <= 0:
            return ArrayShard(x, y, 0, 1, shuffle=False)
        return ArrayShard(x, y, batch_size, steps_per_epoch(len(self.a), world_size, batch_size))

    def _grad(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """grad of mean softplus(-b a^T w) + lam/2 ||w||^2 (no autograd)."""
        s = torch.sigmoid(-b * (a @ w))
        return a.T @ (-b * s) / len(a) + self.lam * w

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        a, b = batch
        w = model.weight
        # The regularizer is part of each f_i (not optimizer weight decay), as in the paper.
        loss = F.softplus(-b * model(a)).mean() + 0.5 * self.lam * (w @ w)
        if not self.vr:
            return loss, None
        ref = self._ref
        if ref is None:
            raise RuntimeError("logreg.loss() before shard(): the L-SVRG reference is per shard")
        with torch.no_grad():
            if ref["w"] is None:                       # w_i = x^0, u_i = grad f_i(x^0)
                ref["w"] = w.detach().clone()
                ref["u"] = self._grad(ref["w"], ref["a"], ref["b"])
            shift = ref["u"] - self._grad(ref["w"], a, b)
        linear = shift @ w
        estimate = loss + (linear - linear.detach())   # gradient: L-SVRG's; value: the batch loss
        coin = np.random.default_rng(derive_seed(0, "lsvrg", ref["k"])).random()
        ref["k"] += 1
        if coin < ref["p"]:                            # w_i = x^k (after this step's estimate)
            with torch.no_grad():
                ref["w"] = w.detach().clone()
                ref["u"] = self._grad(ref["w"], ref["a"], ref["b"])
        return estimate, None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._x_star is None:
            raise RuntimeError("logreg.evaluate() before shard(): the optimum depends on world_size")
        x = model.weight.detach().double().cpu().numpy()
        f, _, _ = _objective(x, self._chunks(self._world), self.lam)
        accuracy = float(np.mean(np.sign(self.a @ x) == self.b))
        return {"loss": float(f), "suboptimality": float(f - self._f_star),
                "dist2": float(np.sum((x - self._x_star) ** 2)), "accuracy": accuracy}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n": int(len(self.a)), "d": int(self.a.shape[1]),
                "f_star": getattr(self, "_f_star", None)}
