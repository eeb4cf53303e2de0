"""The comparison as a Python call: your own model and data, every method, results back as a dict.

What it owns: `compare(model, dataset, ...)`, the same run as `switchagg compare` (a switch and N
worker processes, each method in turn through DDP) on a user's `nn.Module` factory and dataset
function, returning the object that results.json holds. What it must never do: differ from the
command line: it fills the command's own options (every default from the same parser), validates
them with the same checks and runs the same code (`switchagg.workers.compare.run`).

How it works: `model` and `dataset` are top-level functions (or their "module:function" names);
the worker processes import them by name, so they must live in a module or a script file, not in
a lambda or an interactive session. They become the `custom` task (workers/tasks/custom.py).
Any built-in task runs too: `compare(task="logreg", epochs=50)`.

Example::

    from switchagg.workers.api import compare
    results = compare(make_model, load_data, methods=["sgd", "intsgd-random"], workers=2,
                      epochs=3)
    print(results["methods"]["intsgd-random"]["final_accuracy"])
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["compare"]


def compare(model: Callable[[], Any] | str | None = None,
            dataset: Callable[[], Any] | str | None = None, *,
            methods: Iterable[str] | None = None, workers: int = 4, task: str | None = None,
            loss: str = "cross_entropy", out: str | None = None, progress: bool = False,
            **options: Any) -> dict[str, Any]:
    """Compare methods on a model and dataset; returns results.json's object.

    Args:
        model: a function returning a fresh `nn.Module` (called once per worker and method,
            under the same seed), or its "module:function" name.
        dataset: a function returning `(train, test)`, each `(x, y)` tensors or a `Dataset` of
            `(x, y)` pairs, or its "module:function" name.
        methods: method names of `switchagg.methods.METHODS` (default: all).
        workers: worker processes.
        task: a built-in task name or "module:function" factory instead of model and dataset.
        loss: "cross_entropy" (classification; headline metric accuracy) or "mse".
        out: a folder for results.json, table.txt, metrics and plots (default: none kept).
        progress: progress bars on a terminal.
        options: any other option of `switchagg compare`, by its Python name (epochs,
            batch_size, lr, max_steps, eval_every, seed, bits, k, slots, drop, duplicate,
            reorder, device, timeout); task options go in `opt={"hidden": (32,)}`.

    Returns:
        {"config": ..., "methods": {name: entry}, "provenance": ...} as results.json holds it.

    Raises:
        switchagg.workers.validate.UsageError: an option is invalid (a ValueError; it names the option).
        switchagg.workers.compare.CompareError: a worker or the switch failed.
    """
    from switchagg.workers import compare as cli_compare
    from switchagg.workers import validate
    from switchagg.workers.tasks.custom import callable_name

    parser = argparse.ArgumentParser()
    cli_compare.configure(parser)
    args = parser.parse_args([])
    task_options = dict(options.pop("opt", {}) or {})
    for key, value in options.items():
        if not hasattr(args, key) or key in ("opt", "no_progress", "methods", "task"):
            raise TypeError(f"compare() got an unexpected option {key!r}")
        setattr(args, key, value)
    if task is None:
        if model is None or dataset is None:
            raise TypeError("compare() needs model and dataset (or task=...)")
        task = "custom"
        task_options.update(model=callable_name(model), dataset=callable_name(dataset), loss=loss)
    args.task = task
    args.opt = [f"{k}={v!r}" for k, v in task_options.items()]
    args.methods = ",".join(methods) if methods is not None else None
    args.workers = workers
    args.out = out
    args.no_progress = not progress
    built = validate.check_compare(args)
    return cli_compare.run(args, built)
