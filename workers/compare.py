"""`switchagg compare`: train with N workers through the emulated switch, once per method; compare.

What it owns: the whole local experiment: a switch process and N worker processes on loopback, a
progress bar per method, the summary table, and with `--out DIR` results.json, per-step metrics
(JSON lines) and PNG plots. What it must never do: train or reduce anything itself (the workers
do, workers/worker.py), leave a process behind, or wait without a bound.

How it works:
0. Check every option before anything starts (workers/validate.py: the config objects' own rules,
   errors named as the user typed the option, exit status 2, nothing created). `run(args, task)`
   is the same run for Python callers (workers/api.py): it returns what results.json holds.
1. Start `python -m switch_emulator` on a free 127.0.0.1 port (slots, loss injection and seed
   passed through) and wait until it accepts connections.
2. Start N `switchagg worker --events` processes once; each runs every method in turn on a fresh
   model (importing torch costs ~2 s a process, so workers are not respawned per method). `sgd`
   goes through torch.distributed gloo (nccl on CUDA), the integer methods through the switch, one
   switch job per method.
3. Read the workers' event lines (one reader thread per worker feeding one queue): rank 0's
   progress drives the bars; every rank's "done" carries its summary. A worker that reports an
   error, exits early, or goes silent for --timeout seconds ends the run with an error naming the
   rank and the method (and the tail of its log); the switch dying does too.
4. Merge the ranks' summaries per method (workers/report.py), print the table, write the files
   (results.json with the run's settings and provenance: versions, commit, host, command).
Progress: bars on a terminal (log lines print above them); elsewhere a line when each method
starts and ends.
Teardown always runs (success, failure, Ctrl-C): workers get SIGTERM then SIGKILL, the switch
SIGTERM (it aborts its jobs and exits) then SIGKILL. Children run in their own sessions, so a
Ctrl-C reaches only this process, which then tears them down in order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from switchagg.workers.worker import EVENT_PREFIX, add_training_options

__all__ = ["configure", "main", "run", "print_results", "CompareError", "run_compare"]

log = logging.getLogger("switchagg.compare")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CompareError(RuntimeError):
    """The comparison could not finish: a worker or the switch failed (the message says which)."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `switchagg compare`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  switchagg compare                                   # digits, 4 workers, all methods\n"
                     "  switchagg compare --methods sgd,intsgd-random --workers 2 --out runs/a\n"
                     "  switchagg compare --task logreg --epochs 200 --out runs/logreg\n"
                     "  switchagg compare --drop 0.01 --bits 8              # loss and an int8 budget\n"
                     "  switchagg compare --task cifar10-resnet18 --data ~/cifar-10-batches-py --device cuda")
    add_training_options(parser)
    g = parser.add_argument_group("comparison")
    g.add_argument("--workers", type=int, default=4, help="number of worker processes")
    g.add_argument("--out", default=None, help="write results.json, table.txt, metrics/ and plots "
                                               "here (default: nothing kept)")
    g.add_argument("--drop", type=float, default=None,
                   help="switch: drop probability in [0, 1), in and out (default: 0)")
    g.add_argument("--duplicate", type=float, default=None,
                   help="switch: duplication probability in [0, 1] (default: 0)")
    g.add_argument("--reorder", type=float, default=None,
                   help="switch: reordering probability in [0, 1] (default: 0)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (a line per method instead)")
    g.add_argument("--token", default=None, help="start the switch with this token (workers join "
                                                 "with it; default: none, fine on loopback)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Children import this very checkout, installed or not.
    env["PYTHONPATH"] = _REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # One compute thread each: N workers and the switch share the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.pop("SWITCHAGG_RENDEZVOUS", None)  # this run's ranks are compare's own
    return env


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


class _Children:
    """The processes this run started, and their orderly (or forced) end."""

    def __init__(self) -> None:
        self.switch: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._files: list[Any] = []

    def start(self, argv: list[str], log_path: str, *, pipe_stdout: bool) -> subprocess.Popen:
        log_file = open(log_path, "w")
        self._files.append(log_file)
        return subprocess.Popen(argv, env=_child_env(), cwd=os.getcwd(), start_new_session=True,
                                stdin=subprocess.DEVNULL, stderr=log_file,
                                stdout=subprocess.PIPE if pipe_stdout else log_file, text=True,
                                bufsize=1)

    def stop(self, grace: float = 5.0) -> None:
        procs = [p for p in self.workers if p is not None]
        for group in (procs, [self.switch] if self.switch else []):
            for p in group:
                if p.poll() is None:
                    _signal(p, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal(p, signal.SIGKILL)
                    p.wait(timeout=5)
        for f in self._files:
            f.close()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)   # the child's own session: reaches anything it started too
    except ProcessLookupError:
        pass


def _wait_listening(port: int, proc: subprocess.Popen, log_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CompareError(f"the switch exited with status {proc.returncode} before listening:\n"
                               f"{_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise CompareError(f"the switch did not listen on 127.0.0.1:{port} within {timeout:.0f} s; "
                       f"see {log_path}")


def _reader(rank: int, proc: subprocess.Popen, events: queue.Queue, log_path: str) -> None:
    """Forward a worker's event lines to the queue; other stdout lines go to its log."""
    with open(log_path + ".stdout", "w") as other:
        for line in proc.stdout:
            if line.startswith(EVENT_PREFIX):
                try:
                    events.put((rank, json.loads(line[len(EVENT_PREFIX):])))
                except json.JSONDecodeError:
                    other.write(line)
            else:
                other.write(line)
    events.put((rank, {"event": "eof"}))


def _worker_argv(args: argparse.Namespace, rank: int, switch: str, master_port: int,
                 out_dir: str, job: str) -> list[str]:
    argv = [sys.executable, "-m", "switchagg.workers.cli", "--log-level", logging.getLevelName(log.getEffectiveLevel()),
            "worker", "--events", "--rank", str(rank), "--world-size", str(args.workers),
            "--master-addr", "127.0.0.1", "--master-port", str(master_port), "--switch", switch,
            "--job", job, "--out", out_dir, "--task", args.task, "--seed", str(args.seed),
            "--bits", str(args.bits), "--k", str(args.k), "--slots", str(args.slots),
            "--device", args.device, "--timeout", str(args.timeout), "--methods", ",".join(args.method_list)]
    for flag in ("data", "epochs", "max_steps", "batch_size", "lr", "eval_every"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    for opt in args.opt:
        argv += ["--opt", opt]
    for opt in args.method_opt:
        argv += ["--method-opt", opt]
    if args.token:
        argv += ["--token", args.token]
    return argv


def _switch_argv(args: argparse.Namespace, port: int) -> list[str]:
    argv = [sys.executable, "-m", "switch_emulator", "--bind", f"tcp://127.0.0.1:{port}",
            # Two jobs' worth: a fast rank joins method m+1's job while a slower one is still
            # leaving method m's, and the switch holds both pools at that moment.
            "--slots", str(2 * args.slots), "--seed", str(args.seed)]
    for flag in ("drop", "duplicate", "reorder", "token"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag, str(value)]
    return argv


class _Bars:
    """One tqdm bar per method, driven by rank 0's progress events."""

    def __init__(self, methods: list[str], enabled: bool) -> None:
        # Bars redraw in place; on a pipe or a log file they would be noise.
        self.enabled = enabled and sys.stderr.isatty()
        self.methods, self.bars = methods, {}
        self.width = max(len(m) for m in methods)

    def update(self, method: str, step: int, total: int, loss: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        bar = self.bars.get(method)
        if bar is None:
            bar = self.bars[method] = tqdm(total=total, desc=method.ljust(self.width), unit="step",
                                           position=self.methods.index(method), leave=True,
                                           dynamic_ncols=True, file=sys.stderr)
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()

    def finish(self, method: str) -> None:
        bar = self.bars.pop(method, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}


def run_compare(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """Start the switch and the workers, collect every method's per-rank summaries.

    Returns:
        method -> list of per-rank summaries (workers/train.py).

    Raises:
        CompareError: naming the rank and method that failed (or the switch).
    """
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    children = _Children()
    events: queue.Queue = queue.Queue()
    bars = _Bars(args.method_list, enabled=not args.no_progress)
    log.info("starting a switch and %d workers for %s", args.workers, ", ".join(args.method_list))
    try:
        port, master_port = _free_port(), _free_port()
        switch_log = os.path.join(logs, "switch.log")
        children.switch = children.start(_switch_argv(args, port), switch_log, pipe_stdout=False)
        # Compile (or load from numba's cache) the CPU kernels once here, while the switch starts:
        # otherwise N workers would all compile the same kernels at once on a cold cache.
        from switchagg.warmup import warm_up
        warm_up(parallel=False)
        _wait_listening(port, children.switch, switch_log)
        address = f"tcp://127.0.0.1:{port}"
        job = f"compare-{os.getpid()}-{port}"
        worker_logs = [os.path.join(logs, f"worker{r}.log") for r in range(args.workers)]
        for r in range(args.workers):
            proc = children.start(_worker_argv(args, r, address, master_port, out_dir, job),
                                  worker_logs[r], pipe_stdout=True)
            children.workers.append(proc)
            threading.Thread(target=_reader, args=(r, proc, events, worker_logs[r]), daemon=True,
                             name=f"compare-reader-{r}").start()
        if not bars.enabled:
            return _collect(args, children, events, bars, worker_logs, switch_log)
        # Log lines above the bars, not through them.
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():
            return _collect(args, children, events, bars, worker_logs, switch_log)
    finally:
        bars.close()
        children.stop()


def _collect(args, children: _Children, events: queue.Queue, bars: _Bars, worker_logs: list[str],
             switch_log: str) -> dict[str, list[dict]]:
    summaries: dict[str, list[dict]] = {m: [] for m in args.method_list}
    running: dict[int, str | None] = {r: None for r in range(args.workers)}
    finished: set[int] = set()
    last_event = time.monotonic()

    def fail(rank: int, why: str) -> CompareError:
        method = running.get(rank)
        return CompareError(f"worker rank {rank} failed while running method "
                            f"{method or '(before the first method)'}: {why}\n"
                            f"--- {worker_logs[rank]} (tail) ---\n{_tail(worker_logs[rank])}")

    while len(finished) < args.workers:
        try:
            rank, ev = events.get(timeout=0.5)
        except queue.Empty:
            if children.switch.poll() is not None:
                raise CompareError(f"the switch exited with status {children.switch.returncode}:\n"
                                   f"{_tail(switch_log)}") from None
            for r, proc in enumerate(children.workers):
                if r not in finished and proc.poll() is not None and proc.returncode != 0:
                    raise fail(r, f"exit status {proc.returncode}") from None
            if time.monotonic() - last_event > args.timeout:
                stuck = {r: m for r, m in running.items() if r not in finished}
                raise CompareError(f"no progress for {args.timeout:.0f} s (workers and the methods "
                                   f"they were in: {stuck}); see {os.path.dirname(switch_log)}") from None
            continue
        last_event = time.monotonic()
        kind = ev.get("event")
        if kind == "start":
            running[rank] = ev["method"]
            if rank == 0 and not bars.enabled:  # no bars (a pipe, a log file): a line per method
                log.info("%s: started", ev["method"])
        elif kind == "progress":
            bars.update(ev["method"], ev["step"], ev["total"], ev["loss"])
        elif kind == "done":
            summaries[ev["method"]].append(ev["summary"])
            if len(summaries[ev["method"]]) == args.workers:
                bars.finish(ev["method"])
                head = min(summaries[ev["method"]], key=lambda s: s["rank"])
                log.info("%s done: %d steps in %.1f s, evaluation %s", ev["method"], head["steps"],
                         head["wall_s"], head["evaluation"])
        elif kind == "error":
            running[rank] = ev.get("method") or running[rank]
            raise fail(rank, f"{ev.get('error')}: {ev.get('message')}")
        elif kind == "eof":
            proc = children.workers[rank]
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise fail(rank, "closed its output but did not exit") from None
            if proc.returncode != 0:
                raise fail(rank, f"exit status {proc.returncode}")
            missing = [m for m in args.method_list
                       if not any(s["rank"] == rank for s in summaries[m])]
            if missing:
                raise fail(rank, f"exited without finishing {missing}")
            finished.add(rank)
    return summaries


def main(args: argparse.Namespace) -> int:
    """Entry point of `switchagg compare`; returns 0, 1 (a run failed), 2 (bad usage), 130 (Ctrl-C)."""
    from switchagg.workers import validate
    try:
        task = validate.check_compare(args)
    except validate.UsageError as exc:
        return validate.report_usage("compare", exc)
    try:
        results = run(args, task)
    except KeyboardInterrupt:
        print("\nswitchagg compare: interrupted; switch and workers stopped", file=sys.stderr)
        return 130
    except CompareError as exc:
        print(f"switchagg compare: {exc}", file=sys.stderr)
        return 1
    print_results(args, results)
    return 0


def run(args: argparse.Namespace, task) -> dict[str, Any]:
    """Run a validated comparison and return what results.json holds ({"config", "methods"}).

    With `args.out` the files are written there too (results.json, table.txt, metrics/, plots);
    without it the run's temporary folder is removed, logs included, unless the run failed (then
    the error names the folder it kept).

    Raises:
        CompareError: a worker or the switch failed.
        KeyboardInterrupt: passed on after the teardown.
    """
    from switchagg.workers import report
    from switchagg.workers.provenance import provenance, run_config

    out_dir = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="switchagg-compare-")
    os.makedirs(out_dir, exist_ok=True)
    started = time.monotonic()
    try:
        summaries = run_compare(args, out_dir)
    except CompareError as exc:
        if not args.out:
            raise CompareError(f"{exc}\n(logs kept in {out_dir})") from None
        raise
    except BaseException:
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    methods = {m: report.merge_ranks(s, task.metric) for m, s in summaries.items()}
    for name, summary in summaries.items():
        diverged = next((s.get("diverged") for s in summary if s.get("diverged")), None)
        methods[name]["diverged"] = diverged
    config = {**run_config(args, task, args.workers), "wall_s": time.monotonic() - started}
    results = {"config": config, "methods": methods, "provenance": provenance()}
    if args.out:
        records = {m: report.read_jsonl(os.path.join(out_dir, "metrics", f"{m}.rank0.jsonl"))
                   for m in args.method_list}
        results["files"] = report.write_all(out_dir, results, records)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return results


def print_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The run's headline, table and notes on stdout (and where its files went)."""
    from switchagg.workers import report
    config, methods = results["config"], results["methods"]
    print(f"\n{config['task']}, {config['workers']} workers, seed {config['seed']}, "
          f"{config['bits']}-bit budget (wall {config['wall_s']:.0f} s)")
    print(report.format_table(methods, config["metric"]))
    for name, m in methods.items():
        if m.get("diverged"):
            print(f"note: {name} diverged: {m['diverged']}")
        if m["replicas_agree"] is False:  # None: decentralized, the models differ by design
            print(f"WARNING: {name}: workers' parameters differ at the end (a method bug)")
    if results.get("files"):
        out_dir = os.path.dirname(results["files"][0])
        print(f"\nwrote {out_dir}/ " + ", ".join(os.path.basename(p) for p in results["files"])
              + " and metrics/*.jsonl")
