"""The training tasks, by name: `TASKS` maps a name to its `Task` class; `make_task` builds one.

| name               | data                                   | model                   | headline     |
|--------------------|----------------------------------------|-------------------------|--------------|
| `digits` (default) | scikit-learn's bundled 8x8 digits      | MLP 64-128-64-10        | accuracy     |
| `logreg`           | breast_cancer (bundled) or a LIBSVM file| x in R^d, L2-regularized| f(x) - f*    |
| `fashion-mnist`    | Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`, or `--data`) | FC 784-1000-300-100-10 or LeNet-5 | accuracy |
| `cifar10-resnet18` | CIFAR-10 python batches (`--data`)     | ResNet18 (CIFAR)        | accuracy     |
| `wikitext2-lstm`   | WikiText-2 raw text (`--data`)         | 3-layer LSTM, tied      | perplexity   |
| `custom`           | a user's `dataset` function (`--opt`)  | a user's `model` function | accuracy or loss |

Each task lives in its own module; the interface is `switchagg.workers.tasks.base.Task`. A task is anything
callable as `factory(data=..., device=..., **options) -> Task`: the classes in `TASKS` are, and so
is a user's own, named on the command line as `--task module:function` (or `file.py:function`)
and resolved by `make_task` the same way.
"""

from __future__ import annotations

from typing import Any

from switchagg.workers.tasks.base import ArrayShard, Preset, Shard, Task, parse_options
from switchagg.workers.tasks.cifar10 import Cifar10ResNet18
from switchagg.workers.tasks.custom import CustomTask, resolve
from switchagg.workers.tasks.digits import Digits
from switchagg.workers.tasks.fashion_mnist import FashionMNIST
from switchagg.workers.tasks.logreg import LogisticRegression
from switchagg.workers.tasks.wikitext2 import WikiText2LSTM

__all__ = ["TASKS", "make_task", "Task", "Shard", "ArrayShard", "Preset", "parse_options"]

#: task name -> Task class
TASKS: dict[str, Any] = {cls.name: cls for cls in
                         (Digits, LogisticRegression, FashionMNIST, Cifar10ResNet18, WikiText2LSTM,
                          CustomTask)}


def make_task(name: str, *, data: str | None = None, device: str = "cpu", **options: Any) -> Task:
    """Build the task called `name`: a key of TASKS, or "module:function" for a user's own factory.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones), a factory that cannot
            be imported or does not return a Task, or a bad option.
    """
    factory = TASKS.get(name)
    if factory is None:
        if ":" not in name:
            raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}, "
                             "or name your own as module:function")
        factory = resolve(name)
    try:
        task = factory(data=data, device=device, **options)
    except TypeError as exc:
        if factory in TASKS.values() or "argument" not in str(exc):
            raise
        raise ValueError(f"task factory {name!r} must take (data=..., device=..., **options) and "
                         f"return a switchagg.workers.tasks.base.Task ({exc})") from None
    if not isinstance(task, Task):
        raise ValueError(f"task factory {name!r} returned {type(task).__name__}, not a "
                         "switchagg.workers.tasks.base.Task")
    return task
