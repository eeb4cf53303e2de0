"""`fashion-mnist`: Zalando's Fashion-MNIST, a real data set that installs from Debian, two models.

What it owns: reading the original gzip IDX files (Debian's `dataset-fashion-mnist` installs them
in /usr/share/datasets/fashion-mnist; `--data DIR` reads them from elsewhere), the per-worker
shards, the two models and the test accuracy. What it must never do: download the data set, or
fall back silently to other data when the files are missing (the error names the package).

How it works: 60,000 training and 10,000 test images of 28x28 grey pixels, 10 classes. Pixels are
scaled to [0, 1] and standardized with the training set's mean and std (0.2860, 0.3530), batch by
batch on the device (the shards keep uint8). The training set, in the file's order (its labels are
already mixed), is cut into contiguous per-worker shards. Models (`--opt model=...`):
- `fc` (default): the fully-connected 784-1000-300-100-10 ReLU network of ISGQ's experiments
  (1.1 M parameters, about 17,500 packets of 64 int32 per step);
- `lenet`: LeNet-5 (61.7 k parameters).
The preset is momentum SGD (0.9) with the papers' schedule style: a linear warm-up over the first
epoch (lr/10 to lr), then x0.1 at epoch 2 of 3, so IntSGD's alpha sees the learning rate change
every step of the warm-up and once more at the decay. `train_size` / `test_size` take the first N
images of each set (tests use a small slice; 0 = all).

Options:
    model: "fc" or "lenet".
    train_size, test_size: first N images of each set (0: all).
    eval_batch: test images per forward pass (default 2000).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from switchagg.workers.data import contiguous_bounds, load_fashion_mnist, steps_per_epoch
from switchagg.workers.models import MLP, LeNet5
from switchagg.workers.tasks.base import ArrayShard, Preset, Task, evaluate_classifier

__all__ = ["FashionMNIST", "MODELS"]

#: --opt model=... -> what it builds (ISGQ's FC network, LeNet-5).
MODELS = ("fc", "lenet")
#: Training-set pixel statistics (after scaling to [0, 1]).
MEAN, STD = 0.2860, 0.3530


class FashionMNIST(Task):
    """Fashion-MNIST classification (10 classes) with the FC network or LeNet-5."""

    name = "fashion-mnist"
    metric = "accuracy"
    higher_is_better = True
    option_defaults = {"model": "fc", "train_size": 0, "test_size": 0, "eval_batch": 2000}

    preset = Preset(epochs=3, batch_size=64, lr=0.05, momentum=0.9, warmup_epochs=1,
                    lr_milestones=(2,), eval_every=1)

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        if self.options["model"] not in MODELS:
            raise ValueError(f"fashion-mnist: model={self.options['model']!r}; choose one of "
                             f"{', '.join(MODELS)}")
        for key in ("train_size", "test_size"):
            if int(self.options[key]) < 0:
                raise ValueError(f"fashion-mnist: {key} must be >= 0 (0: all), got "
                                 f"{self.options[key]}")
        train_x, train_y, test_x, test_y = load_fashion_mnist(data)
        n_train, n_test = int(self.options["train_size"]), int(self.options["test_size"])
        self.train_x, self.train_y = train_x[:n_train or None], train_y[:n_train or None]
        self.test_x = test_x[:n_test or None].to(self.device)
        self.test_y = test_y[:n_test or None].to(self.device)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 28, 28) -> standardized float32 on the device, shaped for the model."""
        x = (x.to(self.device, torch.float32) / 255.0 - MEAN) / STD
        return x.reshape(len(x), -1) if self.options["model"] == "fc" else x.unsqueeze(1)

    def build_model(self) -> nn.Module:
        if self.options["model"] == "fc":
            return MLP(28 * 28, (1000, 300, 100), 10).to(self.device)
        return LeNet5(10).to(self.device)

    def shard(self, rank: int, world_size: int, batch_size: int) -> ArrayShard:
        n = len(self.train_x)
        start, stop = contiguous_bounds(n, world_size)[rank]
        steps = steps_per_epoch(n, world_size, batch_size) if batch_size > 0 else 1
        return ArrayShard(self.train_x[start:stop], self.train_y[start:stop].to(self.device),
                          batch_size, steps, transform=lambda x, g: self._input(x))

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        x, y = batch
        return F.cross_entropy(model(x), y), None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_classifier(model, self.test_x, self.test_y, int(self.options["eval_batch"]),
                                   self._input)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "train_images": len(self.train_x),
                "test_images": len(self.test_x)}
