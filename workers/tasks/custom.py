"""`custom`: a user's own model and data, compared like a built-in task (`--task custom`).

What it owns: adapting two plain functions to the `Task` interface: `model`, a factory of an
`nn.Module`, and `dataset`, which returns `(train, test)`, each a `(x, y)` pair of tensors or a
torch `Dataset` of such pairs. Both are named `module:function` (or `path/to/file.py:function`),
so every worker process imports the same code. What it must never do: download anything or hold
state shared between workers (each worker calls the functions itself, under the same seed).

How it works: the data are stacked into tensors once per process, shuffled by the seed into
contiguous per-worker shards of the training set, trained with the chosen loss and evaluated on the
whole test set. `loss="cross_entropy"` (default) is classification: the headline metric is the
test accuracy; `loss="mse"` is regression: the headline is the test loss itself. The Python API
(`switchagg.workers.api.compare`) and `switchagg compare --task custom --opt model=... --opt dataset=...`
build this same task.

Options:
    model: "module:function" returning a fresh nn.Module (required).
    dataset: "module:function" returning (train, test) (required).
    loss: "cross_entropy" (default) or "mse".
    epochs, batch_size, lr, momentum, weight_decay: the training preset (defaults 5, 32, 0.05,
        0.9, 0.0); --epochs, --batch-size and --lr override them as for every task.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from switchagg.workers.data import contiguous_bounds, steps_per_epoch
from switchagg.workers.tasks.base import ArrayShard, Preset, Task

__all__ = ["CustomTask", "resolve", "callable_name"]

#: loss option -> (training loss, headline metric)
LOSSES = {"cross_entropy": "accuracy", "mse": "loss"}


def resolve(spec: str) -> Callable[..., Any]:
    """The function named "module:function" or "path/to/file.py:function".

    Raises:
        ValueError: the name is malformed, or its module or function cannot be found.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not module:function (e.g. mypkg.models:make_model)")
    try:
        if module_name.endswith(".py"):
            path = os.path.abspath(module_name)
            key = "switchagg_user_" + str(abs(hash(path)))
            module = sys.modules.get(key)
            if module is None:
                if not os.path.isfile(path):
                    raise ValueError(f"{spec!r}: no file {path}")
                loader_spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[key] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{spec!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


def callable_name(fn: Callable[..., Any]) -> str:
    """The "module:function" (or "file.py:function") name other processes resolve `fn` by.

    Raises:
        ValueError: for a lambda, a nested function or anything else not reachable by name.
    """
    if isinstance(fn, str):
        return fn
    qualname = getattr(fn, "__qualname__", "")
    module = getattr(fn, "__module__", None)
    if not module or "<" in qualname:
        raise ValueError(f"{fn!r} has no importable name: define it at the top level of a module "
                         "(worker processes import it by name)")
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if not path:
            raise ValueError(f"{fn!r} lives in an interactive session; define it in a module file")
        return f"{os.path.abspath(path)}:{qualname}"
    return f"{module}:{qualname}"


def _as_tensors(part: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(torch.is_tensor(t) for t in part):
        x, y = part
    else:
        try:
            pairs = [part[i] for i in range(len(part))]
        except TypeError:
            raise ValueError(f"dataset's {what} part must be (x, y) tensors or a Dataset of "
                             f"(x, y) pairs, got {type(part).__name__}") from None
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"dataset's {what} part: {len(x)} inputs and {len(y)} targets")
    return x, y


class CustomTask(Task):
    """A user's model factory and dataset function, as a task."""

    name = "custom"
    metric = "accuracy"
    higher_is_better = True
    option_defaults = {"model": None, "dataset": None, "loss": "cross_entropy", "epochs": 5,
                       "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        opts = self.options
        for key in ("model", "dataset"):
            if not opts[key]:
                raise ValueError(f"task 'custom' needs the option {key}=module:function")
        if opts["loss"] not in LOSSES:
            raise ValueError(f"task 'custom' option loss={opts['loss']!r}: choose one of "
                             f"{', '.join(LOSSES)}")
        self.metric = LOSSES[opts["loss"]]
        self.higher_is_better = self.metric == "accuracy"
        self.preset = Preset(epochs=int(opts["epochs"]), batch_size=int(opts["batch_size"]),
                             lr=float(opts["lr"]), momentum=float(opts["momentum"]),
                             weight_decay=float(opts["weight_decay"]))
        self._model_fn = resolve(opts["model"])
        train, test = resolve(opts["dataset"])()
        self.train_x, self.train_y = (t.to(self.device) for t in _as_tensors(train, "train"))
        self.test_x, self.test_y = (t.to(self.device) for t in _as_tensors(test, "test"))

    def build_model(self) -> nn.Module:
        model = self._model_fn()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{self.options['model']} returned {type(model).__name__}, not an "
                             "nn.Module")
        return model.to(self.device)

    def shard(self, rank: int, world_size: int, batch_size: int) -> ArrayShard:
        n = len(self.train_x)
        start, stop = contiguous_bounds(n, world_size)[rank]
        steps = steps_per_epoch(n, world_size, batch_size) if batch_size > 0 else 1
        return ArrayShard(self.train_x[start:stop], self.train_y[start:stop], batch_size, steps)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.metric == "accuracy":
            return F.cross_entropy(out, y)
        return F.mse_loss(out.reshape(y.shape), y.to(out.dtype))

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        x, y = batch
        return self._loss(model(x), y), None

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        out = model(self.test_x)
        model.train()
        result = {"loss": float(self._loss(out, self.test_y))}
        if self.metric == "accuracy":
            result["accuracy"] = float((out.argmax(1) == self.test_y).float().mean())
        return result
