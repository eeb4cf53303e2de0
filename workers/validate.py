"""Every option of `switchagg compare`, `worker` and `bench`, checked before any process starts.

What it owns: turning parsed options into the config objects that hold the rules
(`switchagg.workers.train.TrainConfig`, `switchagg.client.ClientConfig`, the switch's `SwitchConfig`, the
task's own options) and translating their `ConfigError`s back into the option as the user typed it
(`--drop -0.1`, not the switch's `drop_ingress`). What it must never do: hold a second copy of a
rule that a config object already checks (it asks the object), start a process, or create a file.

How it works: each check builds the object from the options and lets its `validate()` raise; the
error's `field` maps to a flag through `FLAGS`, and `UsageError` carries the flag, the value and
the reason. The few options that belong to no config object (the device, `--out`, `--workers`,
`--timeout`, ranks) are checked here. The task is built (and its model too: `--opt hidden=foo`
fails there, not after the workers started) and returned, so a caller never builds it twice.
A command turns a `UsageError` into one line on stderr and exit status 2 (`report_usage`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from switchagg.errors import ConfigError

__all__ = ["UsageError", "FLAGS", "check_training", "check_compare", "check_worker", "check_bench",
           "check_device",
           "check_out", "report_usage"]

#: config field -> the option a user typed
FLAGS = {
    "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "max_steps": "--max-steps",
    "eval_every": "--eval-every", "seed": "--seed", "k": "--k", "slots": "--slots",
    "drop_ingress": "--drop", "drop_egress": "--drop", "duplicate": "--duplicate",
    "reorder": "--reorder", "burst": "--slots",
}


class UsageError(ConfigError):
    """An option's value is invalid; `.field` is the option as typed (e.g. "--drop")."""

    def __init__(self, flag: str, value: Any, why: str) -> None:
        shown = format(value, "g") if isinstance(value, float) else value
        super().__init__(f"{flag} {shown}: {why}" if value is not None else f"{flag}: {why}",
                         field=flag, value=value)


def _from_config(exc: ConfigError, value: Any = None) -> UsageError:
    """The config object's error, named as the user's option (its reason kept)."""
    why = str(exc).split(": ", 1)[-1]
    flag = FLAGS.get(exc.field or "", f"--{(exc.field or 'option').replace('_', '-')}")
    return UsageError(flag, exc.value if value is None else value, why)


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and the GPU must be visible to torch.

    Raises:
        UsageError: naming --device.
    """
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError("--device", device, "choose cpu, cuda or cuda:N")
    import torch
    if not torch.cuda.is_available():
        raise UsageError("--device", device, f"no CUDA device is visible to torch {torch.__version__}"
                         f" (built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError("--device", device, f"this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_out(out: str | None) -> None:
    """--out names a folder (existing or to be made), never a file.

    Raises:
        UsageError: naming --out.
    """
    if out is None:
        return
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError("--out", out, "is a file; name a folder (it is created if missing)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError("--out", out, f"{parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK):
        raise UsageError("--out", out, f"{parent} is not writable")


def check_training(args: argparse.Namespace):
    """The training options (shared by compare and worker); returns the task, built once.

    Raises:
        UsageError: naming the option as typed.
    """
    from switchagg.workers.tasks import make_task, parse_options
    from switchagg.workers.worker import method_names, training_config

    try:
        training_config(args).validate()
    except ConfigError as exc:
        raise _from_config(exc) from None
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError("--timeout", args.timeout, "expected a positive number of seconds")
    try:
        args.method_list = method_names(args.methods)
    except ValueError as exc:
        raise UsageError("--methods", args.methods, str(exc)) from None
    from switchagg.workers.worker import check_method_options
    try:
        check_method_options(args.method_list, getattr(args, "method_opt", []))
    except ValueError as exc:
        raise UsageError("--method-opt", " ".join(args.method_opt), str(exc)) from None
    check_client(args.k, args.slots)
    check_device(args.device)
    try:
        from switchagg.workers.swarm_train import SwarmConfig, split_options
        options, swarm_options = split_options(parse_options(args.opt))  # swarmsgd's are not the task's
        if "swarmsgd" in args.method_list:
            SwarmConfig.from_options(swarm_options)
    except ValueError as exc:
        raise UsageError("--opt", " ".join(args.opt), str(exc)) from None
    try:
        task = make_task(args.task, data=args.data, device="cpu", **options)
    except FileNotFoundError as exc:
        raise UsageError("--data", args.data, str(exc)) from None
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        flag, value = ("--opt", " ".join(args.opt)) if options and "option" in str(exc) else \
            ("--task", args.task)
        raise UsageError(flag, value, str(exc)) from None
    if options:
        # A task option reaches the model only when it is built: build it now, not in N workers.
        try:
            task.build_model()
        except Exception as exc:  # noqa: BLE001 - any failure here is the option's fault
            raise UsageError("--opt", " ".join(args.opt),
                             f"task {args.task!r} cannot build its model with these options "
                             f"({type(exc).__name__}: {exc})") from None
    return task


def check_client(k: int, slots: int) -> None:
    """--k and --slots, by the switch client's own rules."""
    from switchagg.client import ClientConfig
    try:
        ClientConfig(k=k, slots=slots, burst=max(1, min(ClientConfig.burst, slots))).validate()
    except ConfigError as exc:
        raise _from_config(exc) from None


def check_compare(args: argparse.Namespace):
    """Every option of `switchagg compare`; returns the task.

    Raises:
        UsageError: naming the option as typed.
    """
    if args.workers < 1:
        raise UsageError("--workers", args.workers, "expected at least 1 worker")
    from switchagg.packet import MAX_WORKERS
    if args.workers > MAX_WORKERS:
        raise UsageError("--workers", args.workers, f"the switch serves at most {MAX_WORKERS} per job")
    for flag in ("drop", "duplicate", "reorder"):
        value = getattr(args, flag)
        if value is not None and not (0 <= value < 1 if flag == "drop" else 0 <= value <= 1):
            raise UsageError("--" + flag, value, "expected a probability in [0, 1)" if flag == "drop"
                             else "expected a probability in [0, 1]")
    task = check_training(args)
    check_switch(args)
    check_out(args.out)
    return task


def check_switch(args: argparse.Namespace) -> None:
    """The switch compare will start, by the switch's own rules (its pool holds two jobs' slots)."""
    try:
        from switch_emulator._config import SwitchConfig
    except ImportError:  # a worker-only install: the switch checks its own options
        return
    values = {"slots": 2 * args.slots, "seed": args.seed}
    for flag in ("duplicate", "reorder"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.drop is not None:
        values["drop_ingress"] = values["drop_egress"] = args.drop
    try:
        SwitchConfig(**values).validate()
    except ConfigError as exc:
        raise _from_config(exc, args.slots if exc.field == "slots" else None) from None


def check_worker(args: argparse.Namespace):
    """Every option of `switchagg worker`; returns the task.

    Raises:
        UsageError: naming the option as typed.
    """
    task = check_training(args)
    if args.world_size is not None and args.world_size < 1:
        raise UsageError("--world-size", args.world_size, "expected at least 1 worker")
    if args.rank is not None and (args.rank < 0 or (args.world_size is not None
                                                    and args.rank >= args.world_size)):
        raise UsageError("--rank", args.rank, f"expected 0 <= rank < world size ({args.world_size})")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UsageError("--master-port", args.master_port, "expected a TCP port in [1, 65535]")
    if args.switch is not None and not args.switch.startswith(("tcp://", "ipc://")):
        raise UsageError("--switch", args.switch, "expected tcp://HOST:PORT or ipc://PATH")
    if args.rendezvous is not None:
        if args.world_size is None:
            raise UsageError("--rendezvous", args.rendezvous, "needs --world-size (or $WORLD_SIZE)")
        host, sep, port = args.rendezvous.removeprefix("tcp://").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError("--rendezvous", args.rendezvous, "expected HOST:PORT")
    if args.connect_timeout is not None and not args.connect_timeout > 0:
        raise UsageError("--connect-timeout", args.connect_timeout, "expected seconds > 0")
    check_out(args.out)
    return task


def report_usage(command: str, exc: UsageError) -> int:
    """Print the usage error as one line and return exit status 2."""
    print(f"switchagg {command}: error: {exc}", file=sys.stderr)
    return 2


def check_bench(args: argparse.Namespace) -> None:
    """Every option of `switchagg bench` (the switch and client options by their objects' rules).

    Raises:
        UsageError: naming the option as typed.
    """
    for flag, low in (("workers", 1), ("numel", 1), ("repeats", 1), ("warmup", 0)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            raise UsageError("--" + flag, value, f"expected an integer >= {low}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError("--timeout", args.timeout, "expected a positive number of seconds")
    from switchagg.client import ClientConfig
    try:
        ClientConfig(k=args.k, slots=args.slots, burst=args.burst).validate()
    except ConfigError as exc:
        flag = "--burst" if exc.field == "burst" else FLAGS.get(exc.field or "", "--" + str(exc.field))
        raise UsageError(flag, exc.value, str(exc).split(": ", 1)[-1]) from None
    for flag in ("drop", "duplicate", "reorder"):
        value = getattr(args, flag)
        if not (0 <= value < 1 if flag == "drop" else 0 <= value <= 1):
            raise UsageError("--" + flag, value, "expected a probability in [0, 1)" if flag == "drop"
                             else "expected a probability in [0, 1]")
