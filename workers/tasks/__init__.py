"""The training tasks, by name: `TASKS` maps a name to its `Task` class; `make_task` builds one.

| name               | data                                   | model                   | headline     |
|--------------------|----------------------------------------|-------------------------|--------------|
| `digits` (default) | scikit-learn's bundled 8x8 digits      | MLP 64-128-64-10        | accuracy     |
| `logreg`           | breast_cancer (bundled) or a LIBSVM file| x in R^d, L2-regularized| f(x) - f*    |
| `fashion-mnist`    | Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`, or `--data`) | FC 784-1000-300-100-10 or LeNet-5 | accuracy |
| `cifar10-resnet18` | CIFAR-10 python batches (`--data`)     | ResNet18 (CIFAR)        | accuracy     |
| `wikitext2-lstm`   | WikiText-2 raw text (`--data`)         | 3-layer LSTM, tied      | perplexity   |

Each task lives in its own module; the interface is `workers.tasks.base.Task`.
"""

from __future__ import annotations

from typing import Any

from workers.tasks.base import ArrayShard, Preset, Shard, Task, parse_options
from workers.tasks.cifar10 import Cifar10ResNet18
from workers.tasks.digits import Digits
from workers.tasks.fashion_mnist import FashionMNIST
from workers.tasks.logreg import LogisticRegression
from workers.tasks.wikitext2 import WikiText2LSTM

__all__ = ["TASKS", "make_task", "Task", "Shard", "ArrayShard", "Preset", "parse_options"]

#: task name -> Task class
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in
                                (Digits, LogisticRegression, FashionMNIST, Cifar10ResNet18, WikiText2LSTM)}


def make_task(name: str, *, data: str | None = None, device: str = "cpu", **options: Any) -> Task:
    """Build the task called `name`.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or a bad option.
    """
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
    return cls(data=data, device=device, **options)
