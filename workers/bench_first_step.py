"""How long until the first DDP step: a 4-rank run of workers/examples/ddp_hook.py, cold and warm.

    python -m switchagg.workers.bench_first_step            # cold numba cache (deleted first), then warm
    python -m switchagg.workers.bench_first_step --warm     # only the warm run
    python -m switchagg.workers.bench_first_step --phases   # also where a warm rank's time goes

What it owns: one figure a new user feels first, the seconds from `torchrun` to rank 0's first
step, on a fresh install (no numba cache: every kernel compiles, once per machine, with the
others waiting on the compile lock) and on the second run (every kernel loads from the cache),
beside a baseline: the same torchrun whose ranks only import torch, build the process group and
wrap the same model in DDP (torch's own floor: DDP's constructor alone imports torch._dynamo).
Each figure comes with the CPU seconds all its processes used (launcher, ranks, switch; the
whole two-step run): on a shared machine the wall time follows the load, the CPU seconds much
less. `--phases` runs an instrumented copy of the example and prints, per phase, rank 0's wall
time since launch and its CPU seconds. It prints the figures; it asserts nothing. What it must
never do: delete anything but numba's cache files (*.nbi, *.nbc) of this checkout's switchagg
package.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXAMPLE = os.path.join(_ROOT, "workers", "examples", "ddp_hook.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def clear_cache() -> int:
    """Delete the numba cache files of switchagg (and NUMBA_CACHE_DIR's, if set); returns count."""
    roots = [os.path.join(_ROOT, "switchagg")] + ([os.environ["NUMBA_CACHE_DIR"]]
                                                  if os.environ.get("NUMBA_CACHE_DIR") else [])
    files = [f for r in roots for ext in ("nbi", "nbc")
             for f in glob.glob(os.path.join(r, "**", f"*.{ext}"), recursive=True)]
    for f in files:
        os.remove(f)
    return len(files)


def _torchrun(ranks: int, script: str, args: list[str], env: dict,
              timeout: float) -> tuple[float, list[str], float]:
    """Launch `script` under torchrun: (seconds to rank 0's "step 0" line, its output, and the
    CPU seconds of the launcher and its ranks)."""
    cpu = _children_cpu()
    started = time.monotonic()
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", str(ranks), script, *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, lines = float("nan"), []
    for line in run.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("step 0 ") and seconds != seconds:
            seconds = time.monotonic() - started
    run.wait(timeout=timeout)
    return seconds, lines, _children_cpu() - cpu


def first_step(ranks: int, script: str = _EXAMPLE,
               timeout: float = 600.0) -> tuple[float, str, float, list[str]]:
    """Seconds from launch to rank 0's "step 0" line, the run's compile lines, the CPU seconds
    of every process (switch included), and the whole output."""
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    port = _free_port()
    cpu = _children_cpu()
    switch = subprocess.Popen([sys.executable, "-m", "switch_emulator", "--bind",
                               f"tcp://127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        seconds, lines, _ = _torchrun(ranks, script, [
            "--switch", f"tcp://127.0.0.1:{port}", "--steps", "2", "--job",
            f"first-step-{port}", "--timeout", "300"], env, timeout)
    finally:
        switch.terminate()
        switch.wait(timeout=10)
    compiles = "\n".join(line.strip() for line in lines if line.startswith("switchagg:"))
    return seconds, compiles, _children_cpu() - cpu, lines


_BASELINE = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)))
if dist.get_rank() == 0:
    print("step 0 (baseline: torch imported, group initialized, DDP built)", flush=True)
dist.destroy_process_group()
"""

#: The example's steps with a timestamp after each phase ("PH name wall cpu" lines, rank 0).
_PHASES = '''
import os, sys, time
T0 = float(os.environ["BENCH_T0"])
def mark(name):
    if os.environ.get("RANK") == "0":
        print(f"PH {name} {time.time() - T0:.2f} {time.process_time():.2f}", flush=True)
mark("interpreter")
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
mark("import torch")
from switchagg.ddp import hook_for
mark("import switchagg")
dist.init_process_group("gloo")
mark("torch.distributed init")
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
mark("DDP construction")
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
state, hook = hook_for("intsgd-random", switch=args["--switch"], job=args["--job"],
                       lr=lambda: optimizer.param_groups[0]["lr"], timeout=300)
model.register_comm_hook(state, hook)
mark("hook_for")
g = torch.Generator().manual_seed(0)
teacher = torch.randn(32, 10, generator=g)
g.manual_seed(1 + dist.get_rank())
x = torch.randn(256, 32, generator=g)
y = (x @ teacher).argmax(dim=1)
for step in range(2):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    state.step_telemetry()
    optimizer.step()
    mark(f"step {step} (join + first bucket)" if step == 0 else f"step {step}")
    if dist.get_rank() == 0 and step == 0:
        print("step 0", flush=True)
state.close()
dist.destroy_process_group()
'''


def baseline(ranks: int, timeout: float = 600.0) -> tuple[float, float]:
    """(seconds, CPU seconds) until the same torchrun has imported torch, built its group and
    wrapped the model in DDP: no switchagg."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_BASELINE)
    try:
        seconds, _, cpu = _torchrun(ranks, f.name, [], env, timeout)
        return seconds, cpu
    finally:
        os.remove(f.name)


def phases(ranks: int) -> list[tuple[str, float, float]]:
    """(phase, rank 0's wall seconds since launch at its end, rank 0's CPU seconds then)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_PHASES)
    os.environ["BENCH_T0"] = repr(time.time())
    try:
        _, _, _, lines = first_step(ranks, f.name)
    finally:
        os.remove(f.name)
        os.environ.pop("BENCH_T0", None)
    out = []
    for line in lines:
        if line.startswith("PH "):
            name, wall, cpu = line[3:].rsplit(" ", 2)
            out.append((name, float(wall), float(cpu)))
    return out


def _load() -> str:
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="DDP processes (default 4)")
    parser.add_argument("--warm", action="store_true", help="skip the cold run")
    parser.add_argument("--phases", action="store_true",
                        help="also time each phase of a warm rank (an instrumented run)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {_load()} before the runs")
    if not args.warm:
        removed = clear_cache()
        seconds, lines, cpu, _ = first_step(args.ranks)
        print(f"cold cache ({removed} cache files removed): first step {seconds:.1f} s after "
              f"launch ({cpu:.1f} CPU s in all)")
        if lines:
            print("  " + lines.replace("\n", "\n  "))
    seconds, _, cpu, _ = first_step(args.ranks)
    print(f"warm cache: first step {seconds:.1f} s after launch ({cpu:.1f} CPU s in all)")
    seconds, cpu = baseline(args.ranks)
    print(f"baseline (the same torchrun importing torch, building its group and DDP, no "
          f"switchagg): {seconds:.1f} s ({cpu:.1f} CPU s in all)")
    if args.phases:
        print("phases of rank 0 (warm): end of phase, s after launch / its CPU s so far")
        before = (0.0, 0.0)
        for name, wall, cpu in phases(args.ranks):
            print(f"  {name:34s} {wall:6.2f} s  cpu {cpu:5.2f} s  (+{cpu - before[1]:.2f})")
            before = (wall, cpu)
    print(_load() + " after the runs")


if __name__ == "__main__":
    main()
