"""How long until the first DDP step: a 4-rank run of workers/examples/ddp_hook.py, cold and warm.

    python -m switchagg.workers.bench_first_step            # cold numba cache (deleted first), then warm
    python -m switchagg.workers.bench_first_step --warm     # only the warm run

What it owns: one figure a new user feels first, the seconds from `torchrun` to rank 0's first
step, on a fresh install (no numba cache: every kernel compiles, once per machine, with the
others waiting on the compile lock) and on the second run (every kernel loads from the cache),
beside a baseline: the same torchrun that only imports torch and builds its process group (on a
loaded machine that alone can take most of the time). It prints the figures; it asserts nothing. What it must never do: delete anything but numba's cache
files (*.nbi, *.nbc) of this checkout's switchagg package.
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_cache() -> int:
    """Delete the numba cache files of switchagg (and NUMBA_CACHE_DIR's, if set); returns count."""
    roots = [os.path.join(_ROOT, "switchagg")] + ([os.environ["NUMBA_CACHE_DIR"]]
                                                  if os.environ.get("NUMBA_CACHE_DIR") else [])
    files = [f for r in roots for ext in ("nbi", "nbc")
             for f in glob.glob(os.path.join(r, "**", f"*.{ext}"), recursive=True)]
    for f in files:
        os.remove(f)
    return len(files)


def first_step(ranks: int, timeout: float = 600.0) -> tuple[float, str]:
    """Seconds from launch to rank 0's "step 0" line, and the run's compile lines."""
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    port = _free_port()
    switch = subprocess.Popen([sys.executable, "-m", "switch_emulator", "--bind",
                               f"tcp://127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", str(ranks),
                                os.path.join(_ROOT, "workers", "examples", "ddp_hook.py"),
                                "--switch", f"tcp://127.0.0.1:{port}", "--steps", "2",
                                "--job", f"first-step-{port}", "--timeout", "300"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds, lines = float("nan"), []
        for line in run.stdout:
            if line.startswith("switchagg:"):
                lines.append(line.strip())
            if line.startswith("step 0 ") and seconds != seconds:
                seconds = time.monotonic() - started
        run.wait(timeout=timeout)
        return seconds, "\n".join(lines)
    finally:
        switch.terminate()
        switch.wait(timeout=10)


_BASELINE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    print("step 0 (baseline: torch imported, group initialized)", flush=True)
dist.destroy_process_group()
"""


def baseline(ranks: int, timeout: float = 600.0) -> float:
    """Seconds until the same torchrun has imported torch and built its group: no switchagg."""
    import tempfile
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_BASELINE)
    try:
        started = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", str(ranks), f.name], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = float("nan")
        for line in run.stdout:
            if line.startswith("step 0 ") and seconds != seconds:
                seconds = time.monotonic() - started
        run.wait(timeout=timeout)
        return seconds
    finally:
        os.remove(f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="DDP processes (default 4)")
    parser.add_argument("--warm", action="store_true", help="skip the cold run")
    args = parser.parse_args()
    if not args.warm:
        removed = clear_cache()
        seconds, lines = first_step(args.ranks)
        print(f"cold cache ({removed} cache files removed): first step {seconds:.1f} s after launch")
        if lines:
            print("  " + lines.replace("\n", "\n  "))
    seconds, _ = first_step(args.ranks)
    print(f"warm cache: first step {seconds:.1f} s after launch")
    print(f"baseline (the same torchrun importing torch and building its group, no switchagg): "
          f"{baseline(args.ranks):.1f} s")


if __name__ == "__main__":
    main()
