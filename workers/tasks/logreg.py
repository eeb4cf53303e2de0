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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.data import contiguous_bounds, steps_per_epoch
from workers.models import LinearModel
from workers.tasks.base import ArrayShard, Preset, Task

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
    """

    name = "logreg"
    metric = "suboptimality"
    higher_is_better = False
    option_defaults = {"lam": 5e-4}

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        self.lam = float(self.options["lam"])
        self.a, self.b = load_logreg_data(data)
        smooth = float(np.linalg.eigvalsh(self.a.T @ self.a / (4 * len(self.a)))[-1]) + self.lam
        # Full local gradients and step 1/L: plain gradient descent for sgd, so f - f* -> 0.
        self.preset = Preset(epochs=300, batch_size=0, lr=1.0 / smooth, eval_every=5)
        self._world = 0
        self._x_star: np.ndarray | None = None

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
        if batch_size <= 0:
            return ArrayShard(x, y, 0, 1, shuffle=False)
        return ArrayShard(x, y, batch_size, steps_per_epoch(len(self.a), world_size, batch_size))

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        a, b = batch
        w = model.weight
        # The regularizer is part of each f_i (not optimizer weight decay), as in the paper.
        return F.softplus(-b * model(a)).mean() + 0.5 * self.lam * (w @ w), None

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
