"""Where a result came from: the versions, the commit, the host and the command behind a run.

What it owns: the `provenance` block of results.json, so a table read months later still says which
code and which machine made it. What it must never do: fail a run (every probe that can go wrong,
such as git being absent or the code not being a checkout, yields None) or wait without a bound.

How it works: versions from the modules' `__version__`, the git commit of the source tree with a `-dirty` mark when tracked files changed
(a 5 s bound on each git call), the host name, platform and CPU count, the UTC time, and the
command line of this process.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from typing import Any

__all__ = ["provenance", "git_commit", "package_version"]

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_version() -> str:
    """switchagg's version (`switchagg.__version__`, kept equal to pyproject's)."""
    from switchagg import __version__
    return __version__


def git_commit(root: str = _SOURCE_ROOT) -> str | None:
    """The source tree's commit (with "-dirty" when tracked files changed), or None."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: not this run's concern
        return None


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The provenance block: versions, git commit, host, command, time."""
    return {
        "switchagg": package_version(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": _version("torch"), "numpy": _version("numpy"), "numba": _version("numba"),
        "pyzmq": _version("zmq"),
        "host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "command": list(sys.argv if argv is None else argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_config(args: Any, task: Any, workers: int | None) -> dict[str, Any]:
    """The settings of a run, as results.json's "config" holds them (the task's preset filled in)."""
    preset = task.preset
    return {
        **task.describe(), "workers": workers, "methods": list(args.method_list),
        "seed": args.seed,
        "epochs": args.epochs if args.epochs is not None else preset.epochs,
        "batch_size": args.batch_size if args.batch_size is not None else preset.batch_size,
        "lr": args.lr if args.lr is not None else preset.lr, "max_steps": args.max_steps,
        "method_options": list(getattr(args, "method_opt", None) or []),
        "bits": args.bits, "lane_bits": getattr(args, "lane_bits", None) or 32, "k": args.k,
        "slots": args.slots,
        "drop": getattr(args, "drop", None), "duplicate": getattr(args, "duplicate", None),
        "reorder": getattr(args, "reorder", None), "device": args.device,
    }
