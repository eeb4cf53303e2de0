"""`cifar10-resnet18`: ResNet18 on CIFAR-10 from local python pickle batches, the paper's preset.

What it owns: reading CIFAR-10 (`--data` = the `cifar-10-batches-py` folder), the per-worker shards,
augmentation, the ResNet18 model, test accuracy. What it must never do: download the data set.

How it works: the preset is the IntSGD/PowerSGD setting: single-worker lr 0.1 scaled by the number
of workers (x16 at 16) through a linear warm-up over the first 5 epochs, Nesterov momentum 0.9,
weight decay 1e-4 on conv/linear weights but not on BatchNorm (nor biases), 300 epochs, lr x0.1 at
epochs 150 and 250, 128 images per worker per step, pad-4 random crop and horizontal flip. By
default momentum and weight decay are applied after the reduce (the baselines' placement).
`--opt recipe=intsgd` is the IntSGD authors' ResNet script instead: lr factor 32 and momentum and
weight decay applied by each worker before the reduce (what is compressed is the locally
momentum-corrected, weight-decayed vector; see workers/train.py for how that sits in DDP); run it
with `--methods intsgd-determ`, the script's deterministic rounding. Each worker keeps its own
BatchNorm running statistics (only gradients are averaged); rank 0's are used to evaluate.

Options:
    width: channels of the first stage (default 64, the real ResNet18; smaller for quick tests).
    eval_batch: test images per forward pass (default 500).
    recipe: "sgd" (default, the baselines') or "intsgd" (the IntSGD ResNet script's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from switchagg.workers.data import (CIFAR_MEAN, CIFAR_STD, augment_crop_flip, contiguous_bounds,
                          load_cifar10, steps_per_epoch)
from switchagg.workers.models import ResNet18
from switchagg.workers.tasks.base import ArrayShard, Preset, Task, evaluate_classifier

__all__ = ["Cifar10ResNet18"]


class Cifar10ResNet18(Task):
    """ResNet18 (CIFAR variant) image classification, 10 classes."""

    name = "cifar10-resnet18"
    metric = "accuracy"
    higher_is_better = True
    option_defaults = {"width": 64, "eval_batch": 500, "recipe": "sgd"}

    preset = Preset(epochs=300, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                    weight_decay=1e-4, decay_norm=False, lr_milestones=(150, 250),
                    warmup_epochs=5, lr_scale="workers", eval_every=5)

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        if self.options["recipe"] not in ("sgd", "intsgd"):
            raise ValueError(f"cifar10-resnet18: recipe={self.options['recipe']!r}; choose sgd "
                             f"or intsgd")
        if self.options["recipe"] == "intsgd":
            self.preset = dataclasses.replace(type(self).preset, lr_scale=32.0,
                                              momentum_before_reduce=True)
        if data is None:
            raise ValueError("cifar10-resnet18 needs --data DIR with the CIFAR-10 python batches "
                             "(data_batch_1..5, test_batch)")
        self.train_x, self.train_y, self.test_x, self.test_y = load_cifar10(data)
        self._mean = torch.tensor(CIFAR_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CIFAR_STD, device=self.device).view(1, 3, 1, 1)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.device, torch.float32) / 255.0 - self._mean) / self._std

    def build_model(self) -> nn.Module:
        return ResNet18(10, width=int(self.options["width"])).to(self.device)

    def shard(self, rank: int, world_size: int, batch_size: int) -> ArrayShard:
        n = len(self.train_x)
        start, stop = contiguous_bounds(n, world_size)[rank]
        steps = steps_per_epoch(n, world_size, batch_size) if batch_size > 0 else 1
        # Augment the uint8 images (cheap), then normalize on the device.
        return ArrayShard(self.train_x[start:stop], self.train_y[start:stop], batch_size, steps,
                          transform=lambda x, g: self._normalize(augment_crop_flip(x, g)))

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        x, y = batch
        return F.cross_entropy(model(x), y.to(self.device)), None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_classifier(model, self.test_x, self.test_y, int(self.options["eval_batch"]),
                                   self._normalize)
