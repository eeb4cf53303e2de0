"""Compile once per machine, visibly: a file lock around filling numba's on-disk cache.

What it owns: the first use of the compiled (numba) kernels on a fresh install. Without it, N
processes that start together (the ranks of one DDP run) each compile the same kernels at the same
time, silently, for tens of seconds on shared cores. With it, one process compiles while the
others wait on a file lock, then load what it wrote in milliseconds; the compiling process prints
one line when it starts and one with the time it took. What it must never do: compile anything
itself (the caller's `warm` does), wait without a bound, or print anything on a warm cache.

How it works: `compile_once(label, warm, dispatchers)` looks for each numba dispatcher's cache
index file (`<cache>/<module>.<function>-<line>.py<ver>.nbi`). If all are there, it runs `warm`
unlocked and quietly (a load). Otherwise it takes an exclusive `fcntl.flock` on a lock file in the
cache folder (or the temporary folder where the cache is not writable), looks again (another
process may have filled the cache meanwhile), and runs `warm` under the lock, saying what it does
on stderr. The wait for the lock is bounded (`LOCK_WAIT_S`): past it, this process compiles on
its own (the lock only saves work; numba's cache writes are atomic per file). Where fcntl is
missing (Windows), there is no lock. Set SWITCHAGG_QUIET_COMPILE=1 to silence the lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["compile_once", "cold_dispatchers", "LOCK_WAIT_S"]

#: Longest wait for another process's compilation (the parallel kernels take 15-20 s alone on
#: 2 cores, the serial ones about as long; 10 minutes covers a machine shared with many builds).
LOCK_WAIT_S = 600.0


def _say(text: str) -> None:
    if os.environ.get("SWITCHAGG_QUIET_COMPILE", "") not in ("", "0"):
        return
    print(f"switchagg: {text}", file=sys.stderr, flush=True)


def _index_path(dispatcher: Any) -> str | None:
    """The cache index file numba reads for this dispatcher (None where numba's layout differs)."""
    try:
        return dispatcher._cache._cache_file._index_path
    except AttributeError:
        return None


def cold_dispatchers(dispatchers: Iterable[Any]) -> list[str]:
    """Names of the dispatchers whose cache index is missing (they will compile on first call)."""
    cold = []
    for d in dispatchers:
        path = _index_path(d)
        if path is not None and not os.path.exists(path):
            cold.append(getattr(d, "__name__", repr(d)))
    return cold


def _lock_path(dispatchers: list[Any]) -> str:
    paths = [p for p in map(_index_path, dispatchers) if p]
    folder = os.path.dirname(paths[0]) if paths else tempfile.gettempdir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        folder = tempfile.gettempdir()
    if not os.access(folder, os.W_OK):
        folder = tempfile.gettempdir()
    key = hashlib.sha1(os.path.dirname(paths[0]).encode() if paths else b"").hexdigest()[:12]
    return os.path.join(folder, f"switchagg-compile-{key}.lock")


@contextlib.contextmanager
def _file_lock(path: str, label: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock here: every process compiles for itself
        yield
        return
    with open(path, "a+") as f:
        deadline = time.monotonic() + LOCK_WAIT_S
        said = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not said:
                    _say(f"waiting for another process compiling the {label} (lock {path})")
                    said = True
                if time.monotonic() > deadline:
                    _say(f"still locked after {LOCK_WAIT_S:.0f} s; compiling here instead")
                    yield
                    return
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def compile_once(label: str, warm: Callable[[], None], dispatchers: Iterable[Any]) -> float:
    """Run `warm` (which calls every kernel once) so that each kernel compiles once per machine.

    Args:
        label: what is compiled, for the lines on stderr ("CPU quantize kernels").
        warm: calls the kernels with the types used at run time.
        dispatchers: the numba dispatchers `warm` reaches (their cache files say cold or warm).

    Returns:
        Seconds `warm` took.
    """
    dispatchers = list(dispatchers)
    if not cold_dispatchers(dispatchers):
        started = time.monotonic()
        warm()
        return time.monotonic() - started
    with _file_lock(_lock_path(dispatchers), label):
        cold = cold_dispatchers(dispatchers)
        if cold:
            _say(f"compiling the {label} ({len(cold)} functions, once per machine; later runs "
                 "load them from numba's cache; `switchagg warmup` does this ahead of time)...")
        started = time.monotonic()
        warm()
        elapsed = time.monotonic() - started
        if cold:
            _say(f"compiled the {label} in {elapsed:.1f} s")
        return elapsed
