"""What a task is: a model, a per-worker data shard, a loss, an evaluation, and a training preset.

What it owns: the small interface every task implements (`Task`, `Shard`, `Preset`), so the training
loop (workers/train.py) runs any task with any method unchanged. What it must never do: touch the
collective or the method (a task never knows how gradients travel), or hold state shared between
workers (each worker builds its own task object).

How it works: the loop asks the task for a freshly built model (under a seeded torch generator, so
every worker starts from the same weights), a `Shard` for (rank, world_size), and then, per step,
`loss(model, batch, carry)`; `carry` is what a task keeps between steps of one epoch (the LSTM's
hidden state) and is None at the start of each epoch. `evaluate(model)` returns a flat dict of
floats that always holds "loss" and the task's headline `metric`.
"""

from __future__ import annotations

import ast
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from switchagg.workers.data import batch_indices

__all__ = ["Preset", "Shard", "ArrayShard", "Task", "evaluate_classifier", "parse_options"]


@dataclass(frozen=True)
class Preset:
    """A task's training defaults (each one can be overridden from the command line).

    Attributes:
        epochs: passes over each worker's shard.
        batch_size: examples per worker per step (0: the whole shard, i.e. full local gradients).
        lr: initial learning rate.
        momentum: heavy-ball momentum, applied after the reduce (PowerSGD's default placement).
        nesterov: Nesterov variant of the momentum.
        weight_decay: L2 factor, applied by the optimizer after the reduce.
        decay_norm: whether normalization (BatchNorm) parameters and biases get weight decay.
        lr_milestones: epochs at which the lr is multiplied by lr_gamma.
        lr_gamma: the decay factor.
        warmup_epochs: linear warm-up over these epochs (0: none): from lr/10 to lr, or with
            lr_scale from lr to lr x factor.
        lr_scale: the authors' (PowerSGD's) large-batch rule: the single-worker lr is scaled by
            this factor, reached by a linear warm-up; "workers" means x the number of workers
            (None: no scaling).
        momentum_before_reduce: each worker applies weight decay and its own momentum to its
            gradient before the reduce (the IntSGD ResNet script's placement) and the optimizer
            then takes a plain step with the average (workers/train.py).
        grad_clip: per-worker gradient-norm clip before compression (None: none).
        eval_every: evaluate every this many epochs (and always after the last).
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norm: bool = True
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    lr_scale: str | float | None = None
    momentum_before_reduce: bool = False
    grad_clip: float | None = None
    eval_every: int = 1

    def lr_factor(self, world_size: int = 1) -> float:
        """The factor `lr_scale` multiplies the single-worker lr by (1 without it)."""
        if self.lr_scale is None:
            return 1.0
        return float(world_size) if self.lr_scale == "workers" else float(self.lr_scale)

    def lr_at(self, epoch_float: float, base_lr: float | None = None, world_size: int = 1) -> float:
        """The learning rate at a fractional epoch (warm-up, then step decays)."""
        lr = self.lr if base_lr is None else base_lr
        factor = self.lr_factor(world_size)
        warming = self.warmup_epochs and epoch_float < self.warmup_epochs
        if self.lr_scale is not None:   # PowerSGD: linear from lr to lr x factor
            share = epoch_float / self.warmup_epochs if warming else 1.0
            lr *= 1.0 + (factor - 1.0) * share
        elif warming:
            lr *= 0.1 + 0.9 * epoch_float / self.warmup_epochs
        return lr * self.lr_gamma ** sum(epoch_float >= m for m in self.lr_milestones)


class Shard(ABC):
    """One worker's part of the training data."""

    #: steps per epoch; the same on every worker (collectives need every rank at every step)
    steps_per_epoch: int

    @abstractmethod
    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        """Yield exactly `steps_per_epoch` batches for `epoch`, in an order fixed by `generator`."""
        raise NotImplementedError


class ArrayShard(Shard):
    """A shard of (x, y) tensors, visited in seeded random order, with an optional batch transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, *,
                 shuffle: bool = True, transform=None) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size if batch_size > 0 else len(x)
        self.steps_per_epoch = steps
        self.shuffle = shuffle
        self.transform = transform

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in batch_indices(len(self.x), self.batch_size, self.steps_per_epoch, generator,
                                 shuffle=self.shuffle):
            x = self.x[idx]
            if self.transform is not None:
                x = self.transform(x, generator)
            yield x, self.y[idx]


class Task(ABC):
    """A training problem. Subclasses set `name`, `metric`, `higher_is_better` and `preset`.

    Args:
        data: a local file or folder with the task's data (None: the task's bundled default, if any).
        device: where batches and models live ("cpu", "cuda", "cuda:1").
        options: task-specific settings (documented per task); unknown ones raise ValueError.
    """

    name: ClassVar[str]
    #: the headline evaluation number ("accuracy", "perplexity", "suboptimality")
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    #: option name -> default, for the task-specific settings this task accepts
    option_defaults: ClassVar[dict[str, Any]] = {}

    preset: Preset

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise ValueError(f"task {self.name!r} has no option(s) {unknown}; "
                             f"valid: {sorted(self.option_defaults) or 'none'}")
        self.data = data
        self.device = torch.device(device)
        self.options = {**self.option_defaults, **options}

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialized model on `self.device` (draws from torch's global generator)."""
        raise NotImplementedError

    @abstractmethod
    def shard(self, rank: int, world_size: int, batch_size: int) -> Shard:
        """The training data of worker `rank` out of `world_size`, in batches of `batch_size`."""
        raise NotImplementedError

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        """The training loss of one batch, and what to carry to the next step of the epoch."""
        raise NotImplementedError

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out numbers: always "loss" and `self.metric`, plus any task extras."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; without `preset.decay_norm`, 1-D parameters get no decay."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.preset.decay_norm or weight_decay == 0:
            return [{"params": params, "weight_decay": weight_decay}]
        # BatchNorm weights/biases and linear biases are the 1-D parameters (PowerSGD/IntSGD code).
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def describe(self) -> dict[str, Any]:
        """The task's configuration, for results.json."""
        return {"task": self.name, "data": self.data, "metric": self.metric,
                "options": dict(self.options)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                        prepare=lambda x: x) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y), `batch` rows at a time.

    `prepare` turns a slice of x into the model's input (normalization, the device); y moves to
    the logits' device. The model is in eval mode during the pass and back in train mode after.
    """
    import torch.nn.functional as F
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(prepare(x[i:i + batch]))
        target = y[i:i + batch].to(logits.device)
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train()
    return {"loss": total_loss / len(x), "accuracy": correct / len(x)}


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ["hidden=(32,)", "lam=1e-3", "name=foo"] into a dict (Python literals, else strings).

    Raises:
        ValueError: for an item without "=".
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"task option {pair!r} is not KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key.strip()] = text
    return out
