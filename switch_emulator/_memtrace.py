"""Where the switch's memory goes: an opt-in tracer for soaks and leak hunts.

What it owns: with `SWITCHAGG_TRACEMALLOC=PATH` in the switch's environment, a daemon thread that
starts `tracemalloc` and, every `SWITCHAGG_TRACEMALLOC_S` seconds (default 10) and once at exit,
appends one JSON line to PATH: the process's RSS, what Python and numpy hold (traced), and the
top allocation sites. What it must never do: run unless asked (tracing slows every allocation),
or touch the switch's state: it only reads the process's own figures.

How to read it: RSS far above `traced_mib` is memory Python never allocated itself: libzmq's
queued messages (received and not yet read, or sent and not yet written) and the allocator's
retained free pages. A `traced_mib` that grows names its lines in `top`.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import tracemalloc

__all__ = ["ENV", "start_from_env"]

ENV = "SWITCHAGG_TRACEMALLOC"
ENV_INTERVAL = "SWITCHAGG_TRACEMALLOC_S"
#: Allocation sites listed per line, and frames kept per allocation (deeper: slower).
TOP = 15
FRAMES = 6


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _write(path: str, started: float) -> None:
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("traceback")[:TOP]
    current, peak = tracemalloc.get_traced_memory()
    line = {"t": round(time.monotonic() - started, 1), "rss_mib": round(_rss_mib(), 1),
            "traced_mib": round(current / 2**20, 1), "traced_peak_mib": round(peak / 2**20, 1),
            "top": [{"mib": round(s.size / 2**20, 2), "count": s.count,
                     "at": [f"{fr.filename.rsplit('/', 2)[-1]}:{fr.lineno}"
                            for fr in s.traceback[:FRAMES]]} for s in stats]}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def start_from_env() -> bool:
    """Start the tracer if `SWITCHAGG_TRACEMALLOC` names a file; returns whether it started."""
    path = os.environ.get(ENV, "")
    if not path:
        return False
    interval = float(os.environ.get(ENV_INTERVAL, "10"))
    tracemalloc.start(FRAMES)
    started = time.monotonic()

    def loop() -> None:
        while True:
            time.sleep(interval)
            _write(path, started)

    threading.Thread(target=loop, name="memtrace", daemon=True).start()
    atexit.register(_write, path, started)
    return True
