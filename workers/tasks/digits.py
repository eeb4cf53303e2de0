"""`digits`: an MLP on scikit-learn's bundled handwritten digits, the embedded default task.

What it owns: the data (8x8 grey images, 1797 of them, shipped inside scikit-learn, so nothing is
downloaded), a fixed stratified train/test split (75/25, random_state 0), the model and the test
accuracy. What it must never do: depend on anything outside the installed packages.

How it works: pixels are centred and scaled by the training set's per-pixel mean and std; the training set (already
shuffled by the split) is cut into contiguous per-worker shards; an MLP 64 -> 128 -> 64 -> 10
(~17 k parameters, ~270 packets of 64 int32 per step) trains with momentum SGD. The preset is sized
so that `switchagg compare` (4 workers, 7 methods) finishes in about 3 minutes on 2 CPU cores while
full-precision SGD clearly passes 90% test accuracy.

Options:
    hidden: hidden layer sizes (default (128, 64)).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from switchagg.workers.data import contiguous_bounds, steps_per_epoch
from switchagg.workers.models import MLP
from switchagg.workers.tasks.base import ArrayShard, Preset, Task

__all__ = ["Digits"]


class Digits(Task):
    """MLP classification of the 8x8 digits (10 classes)."""

    name = "digits"
    metric = "accuracy"
    higher_is_better = True
    option_defaults = {"hidden": (128, 64)}

    preset = Preset(epochs=20, batch_size=32, lr=0.05, momentum=0.9, eval_every=1)

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        if data is not None:
            raise ValueError("the digits task uses scikit-learn's bundled data; drop --data")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        # Pixels are 0..16; a floor of 1 on the std keeps near-constant corner pixels (all zero in
        # training, occasionally not in test) from blowing up.
        mean, std = xtr.mean(0), np.maximum(xtr.std(0), 1.0)
        self.train_x = torch.tensor((xtr - mean) / std, dtype=torch.float32, device=self.device)
        self.test_x = torch.tensor((xte - mean) / std, dtype=torch.float32, device=self.device)
        self.train_y = torch.tensor(ytr, dtype=torch.int64, device=self.device)
        self.test_y = torch.tensor(yte, dtype=torch.int64, device=self.device)

    def build_model(self) -> nn.Module:
        return MLP(64, tuple(self.options["hidden"]), 10).to(self.device)

    def shard(self, rank: int, world_size: int, batch_size: int) -> ArrayShard:
        n = len(self.train_x)
        start, stop = contiguous_bounds(n, world_size)[rank]
        steps = steps_per_epoch(n, world_size, batch_size) if batch_size > 0 else 1
        return ArrayShard(self.train_x[start:stop], self.train_y[start:stop], batch_size, steps)

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        x, y = batch
        return F.cross_entropy(model(x), y), None

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(self.test_x)
        model.train()
        return {"loss": float(F.cross_entropy(logits, self.test_y)),
                "accuracy": float((logits.argmax(1) == self.test_y).float().mean())}
