"""`switchagg bench`: packet-level throughput of the aggregation path, against its two yardsticks.

What it owns: starting, timing and tearing down three local contenders over the same tensor, worker
count, transport and (for the first two) message sizes and window, and reporting them side by side
(SwitchML's metric, ATE/s = aggregated tensor elements per second = numel / time of one
all-reduce):
  1. the emulated switch (`python -m switch_emulator`, `--pipes P` dataplane processes) with N
     `SwitchClient` workers, in lanes of `--lane-bits` (inputs span the lanes, sums wrap there,
     and the figures say the real bytes: 16-byte headers + k lanes per packet);
  2. the raw ZeroMQ fan-in/fan-out ceiling: a relay with the switch's socket pattern and framing
     that sums nothing (workers/_bench_workers.py says exactly what it does);
  3. torch.distributed gloo `all_reduce(SUM)` of the same int32 tensor among N processes.
On loopback (ipc or tcp) by default; with `--link RATE` every process runs in a network namespace
of its own on links shaped to RATE (workers/_netns_links.py), and the figures gain the link limit
(what a perfect switch reaches) and the ratios to it. `--sweep` repeats the run over worker counts
and networks (workers/_bench_sweep.py).
What it must never do: report a figure for a wrong sum (every all-reduce is verified exactly, and a
mismatch fails the run), leave a child or a namespace behind (everything is torn down on success,
failure, SIGTERM and Ctrl-C), or wait without a bound. It asserts no target; it prints figures.

How it works: the switch is started first and timed until it serves (interpreter, imports, the
compiled pass: its start-up, reported apart and kept out of its per-round CPU). Then each contender
is one phase. A phase spawns its children (fresh interpreters, so only the gloo workers import
torch), which set up and pre-fault everything, then run warm-up and timed rounds, each behind a
start barrier; a round's time is its slowest worker's, and a phase's figure comes from its median
round. The switch phase also reports its calls' latency distribution (median, p90, p99, max of the
round times, and max / median): how evenly loss recovery keeps its pace. On the project's 2-core VM every contender shares the same two cores on loopback, so CPU
seconds per all-reduce (printed too) are the steadier figure there; on links the link is.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable

from switchagg.packet import LANE_BITS, VALID_K, packet_bytes
from switchagg.workers import _bench_sweep
from switchagg.workers import _bench_workers as bw
from switchagg.workers._netns_links import LinkError, LinkNetwork, check_can_build, parse_rate

__all__ = ["BenchError", "configure", "main", "run_bench"]

log = logging.getLogger("switchagg.bench")

#: Seconds a child gets to exit after the phase before it is terminated, then killed.
_EXIT_GRACE = 3.0
#: Seconds the switch may take to start (its pipes included) before the run fails; apart from
#: --timeout, which bounds the timed phases.
STARTUP_TIMEOUT = 120.0
#: Workers a --link run may have (one namespace and one shaped veth pair each).
MAX_LINK_WORKERS = 16


class BenchError(RuntimeError):
    """A phase failed: a child raised, died, got a wrong sum, or the phase ran out of time."""


def configure(parser: argparse.ArgumentParser) -> None:
    """The `switchagg bench` options."""
    a = parser.add_argument
    a("--workers", type=int, default=4, help="worker processes N (default 4)")
    a("--numel", type=int, default=16 << 20, help="int32 elements per all-reduce (default 16Mi "
                                                  "= 64 MiB)")
    a("--k", type=int, default=64, choices=VALID_K, help="lanes (values) per packet (default 64)")
    a("--lane-bits", type=int, default=32, choices=LANE_BITS,
      help="the switch job's lane width: packets carry k lanes of 8, 16 or 32 bits, inputs span "
           "that range and sums wrap at it (default 32; the relay and gloo move int32)")
    a("--slots", type=int, default=8192, help="slot pool per job: the window (default 8192)")
    a("--burst", type=int, default=1024, help="packets per ZeroMQ message (default 1024)")
    a("--repeats", type=int, default=5, help="timed all-reduces per contender (default 5)")
    a("--warmup", type=int, default=1, help="untimed all-reduces first (default 1)")
    a("--transport", choices=("ipc", "tcp"), default="ipc",
      help="ipc:// in a temporary folder (default, local runs) or tcp://127.0.0.1")
    a("--drop", type=float, default=0.0, help="switch drop probability per packet, each way")
    a("--duplicate", type=float, default=0.0, help="switch duplication probability")
    a("--reorder", type=float, default=0.0, help="switch reordering probability")
    a("--seed", type=int, default=0, help="seed of the switch's loss injection")
    a("--pipes", type=int, default=1, help="dataplane processes of the switch "
                                            "(switch-emulator --pipes; default 1)")
    a("--skip-gloo", action="store_true", help="do not measure torch.distributed gloo")
    a("--skip-zmq", action="store_true", help="do not measure the raw ZeroMQ ceiling")
    a("--timeout", type=float, default=600.0, help="seconds each contender may take in all")
    a("--json", action="store_true", help="print one JSON object instead of the table")
    a("--quantize", action="store_true",
      help="instead: throughput of the quantization kernels next to copy bandwidth "
           "(workers/bench_quantize.py; uses --numel, --repeats, --device)")
    a("--device", choices=("cpu", "cuda"), default="cpu", help="--quantize: where to run")
    a("--link", metavar="RATE", default=None,
      help="emulated links (root only): every worker in its own network namespace, joined to "
           "the switch's by a veth pair shaped to RATE each way with tc tbf (e.g. 500mbit); "
           "gloo's ring runs over the same links. Adds the link limit and ratios to it")
    a("--sweep", action="store_true",
      help="instead: the scaling table, ATE/s for 2, 4, 8 (16 with >= 8 cores) workers on "
           "loopback and, with --link, on emulated links; writes a PNG (--plot)")
    a("--sweep-workers", type=_worker_list, default=None, metavar="N,N,...",
      help="--sweep: worker counts (default 2,4,8, and 16 with >= 8 cores)")
    a("--plot", default="bench-sweep.png", help="--sweep: where to write the PNG "
                                                "(default bench-sweep.png)")


def _worker_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of worker counts like 2,4,8")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts must be >= 1")
    return counts


def _free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _stop_processes(procs: list[mp.Process], grace: float = _EXIT_GRACE) -> None:
    """Let children exit within `grace` seconds (together), then SIGTERM, then SIGKILL them."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for stop in (mp.Process.terminate, mp.Process.kill):
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            stop(p)
        deadline = time.monotonic() + _EXIT_GRACE
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))


def _stop_popen(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the switch ABORTs its jobs and exits 0
        try:
            proc.wait(_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_EXIT_GRACE)


#: What the switch logs (at INFO) once it is bound and its compiled pass is loaded.
_READY_LINE = "switch listening on"


def _start_switch(cmd: list[str], stack: ExitStack, timeout: float = STARTUP_TIMEOUT
                  ) -> tuple[subprocess.Popen, float, float]:
    """Start the switch and wait until it serves; returns (process, start-up s, its CPU s then).

    Start-up is everything before the socket is bound: the interpreter, imports and loading (or
    compiling) the dataplane's compiled pass. A thread keeps reading the switch's log (INFO) so
    that its pipe never fills, and keeps the last lines for an error message.

    Raises:
        BenchError: the switch exited, or was not ready within `timeout` seconds.
    """
    start = time.perf_counter()
    switch = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stack.callback(_stop_popen, switch)
    ready, tail = threading.Event(), []

    def read_log() -> None:
        for line in switch.stderr:
            if _READY_LINE in line:
                ready.set()
            if "WARNING" in line or "ERROR" in line:
                sys.stderr.write(line)
            tail[:] = (tail + [line.rstrip()])[-5:]

    threading.Thread(target=read_log, name="bench-switch-log", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if switch.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with code {switch.returncode}" if switch.poll() is not None
                   else f"was not serving within {timeout:.0f}s")
            raise BenchError(f"the switch {why}: " + " | ".join(tail))
    return switch, time.perf_counter() - start, _cpu_seconds(switch.pid)


def _phase(name: str, target: Callable, spec: bw.Spec, timeout: float, stack: ExitStack,
           alive: Callable[[], str | None] = lambda: None) -> list[dict]:
    """Run N workers of one contender; returns their reports in rank order.

    Args:
        name: the contender, for messages.
        target: the worker body (`bw.switch_worker`, ...).
        spec: the phase's parameters.
        timeout: seconds for the whole phase.
        stack: where the children's teardown is registered (it runs whatever happens).
        alive: returns why a helper process (switch, relay) died, or None while it runs.

    Raises:
        BenchError: a worker failed, died or the phase ran out of time.
    """
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(spec.workers), ctx.Queue()
    procs = [ctx.Process(target=target, args=(spec, r, barrier, results), daemon=True,
                         name=f"bench-{name}-{r}") for r in range(spec.workers)]
    stack.callback(_stop_processes, procs)
    for p in procs:
        p.start()
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < spec.workers:
            try:
                status, rank, body = results.get(timeout=0.5)
            except queue_module.Empty:
                dead = [p.name for r, p in enumerate(procs)
                        if r not in reports and p.exitcode is not None]
                why = alive()
                if dead or why:
                    raise BenchError(f"{name}: {why or ', '.join(dead) + ' exited unreported'}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: not done within {timeout:.0f}s (raise --timeout, "
                                     f"or lower --numel/--repeats)")
                continue
            if status != "ok":
                raise BenchError(f"{name} rank {rank} failed: {body}")
            reports[rank] = body
    except BaseException:
        barrier.abort()  # release ranks still waiting at the start line
        _stop_processes(procs, grace=0.0)  # no point letting them finish
        raise
    return [reports[r] for r in range(spec.workers)]


def _median_round(reports: list[dict]) -> tuple[float, list[float], float]:
    """(median round time, every round's time, median CPU seconds of all workers in a round).

    A round ends when its slowest worker is done.
    """
    rounds = [max(times) for times in zip(*(r["times"] for r in reports))]
    cpu = [sum(used) for used in zip(*(r["cpu"] for r in reports))]
    return statistics.median(rounds), rounds, statistics.median(cpu)


def call_latency(rounds: list[float]) -> dict[str, float]:
    """The per-call latency distribution of a phase: median, p90, p99 and max of its rounds'
    times (each round is one all-reduce, done when its slowest worker is), and max / median.

    Percentiles are nearest-rank (the smallest round time with at least that share of rounds
    at or below it), so they are always a measured call and p99 of fewer than 100 calls is the
    slowest one.
    """
    ordered = sorted(rounds)
    rank = lambda q: ordered[max(0, -(-len(ordered) * q // 100) - 1)]  # noqa: E731
    median = statistics.median(ordered)
    return {"median": median, "p90": rank(90), "p99": rank(99), "max": ordered[-1],
            "max_over_median": ordered[-1] / median if median > 0 else float("inf")}


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process and its live children (the
    switch's pipes) have used so far; 0 if unknown."""
    def own(p: int) -> tuple[float, int]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1])
        except (OSError, ValueError, IndexError):
            return 0.0, -1

    total = own(pid)[0]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            used, parent = own(int(entry))
            if parent == pid:
                total += used
    return total


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every contender that is not skipped; returns the figures (the JSON object).

    Raises:
        BenchError: a contender failed (wrong sum, a child died, out of time).
        ValueError: an option is out of range.
    """
    if args.workers < 1 or args.numel < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--workers, --numel and --repeats must be >= 1, --warmup >= 0")
    if not 1 <= args.burst <= args.slots:
        raise ValueError(f"--burst {args.burst} must be in [1, --slots {args.slots}]")
    link = getattr(args, "link", None)
    if link is not None:
        if not 2 <= args.workers <= MAX_LINK_WORKERS:
            raise ValueError(f"--link runs 2 to {MAX_LINK_WORKERS} workers, not {args.workers}")
        parse_rate(link)  # a bad rate is a bad option, before anything is built
        check_can_build()
    figures: dict[str, Any] = {
        "workers": args.workers, "numel": args.numel, "k": args.k, "slots": args.slots,
        "burst": args.burst, "repeats": args.repeats, "warmup": args.warmup,
        "transport": "tcp" if link else args.transport, "drop": args.drop,
        "duplicate": args.duplicate, "reorder": args.reorder, "cores": os.cpu_count(),
        "pipes": args.pipes,
        "lane_bits": getattr(args, "lane_bits", 32),
        "message_bytes": args.burst * packet_bytes(args.k, getattr(args, "lane_bits", 32)),
        "link": link,
        "link_limit_ate_per_s": None,
    }
    with ExitStack() as stack:
        folder, net, netns = None, None, ""
        if link is not None:
            # Built first, so removed last: after every child in it has been stopped.
            net = stack.enter_context(LinkNetwork(args.workers, link))
            netns = net.tag
            figures["link_limit_ate_per_s"] = net.bits_per_s / 8 / 4  # int32 per second
            ports = iter(range(5555, 6000))
            # The switch (or relay) binds in its namespace; rank r reaches it on its own link.
            endpoint = lambda _: f"tcp://{net.gateway_ip('{rank}')}:{next(ports)}"  # noqa: E731
        elif args.transport == "ipc":
            folder = tempfile.mkdtemp(prefix="switchagg-bench-")
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            endpoint = lambda name: f"ipc://{folder}/{name}"  # noqa: E731
        else:
            endpoint = lambda _: _free_tcp()  # noqa: E731
        make = lambda address: bw.Spec(address, args.workers, args.numel, args.k,  # noqa: E731
                                       args.slots, args.burst, args.warmup, args.repeats, netns,
                                       getattr(args, "lane_bits", 32))

        # 1. The emulated switch.
        address = endpoint("switch")
        bind = address if net is None else "tcp://0.0.0.0:" + address.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "switch_emulator", "--bind", bind, "--log-level",
               "INFO", "--stats-interval", "0", "--slots", str(max(args.slots, 65536)),
               "--drop", str(args.drop), "--duplicate", str(args.duplicate), "--reorder",
               str(args.reorder), "--seed", str(args.seed), "--pipes", str(args.pipes)]
        if net is not None:
            cmd = ["ip", "netns", "exec", net.switch_ns, *cmd]  # execs: the same pid
        switch, startup_s, startup_cpu = _start_switch(cmd, stack)
        died = lambda: (f"the switch exited with code {switch.returncode}"  # noqa: E731
                        if switch.poll() is not None else None)
        reports = _phase("switch", bw.switch_worker, make(address), args.timeout, stack, died)
        rounds_run = args.warmup + args.repeats
        # Start-up (imports, loading the compiled pass) is reported apart; joining stays in.
        switch_cpu = (_cpu_seconds(switch.pid) - startup_cpu) / rounds_run
        figures.update(switch_startup_s=startup_s, switch_startup_cpu_s=startup_cpu)
        seconds, rounds, worker_cpu = _median_round(reports)
        per_round = lambda key: sum(r[key] for r in reports) / args.repeats  # noqa: E731
        figures.update(
            seconds_per_allreduce=seconds, rounds_s=rounds, ate_per_s=args.numel / seconds,
            call_s=call_latency(rounds),
            worker_cpu_s=worker_cpu, switch_cpu_s=switch_cpu,
            packets_per_s=per_round("packets_sent") / seconds,
            retransmitted=sum(r["retransmitted"] for r in reports),
            bytes_sent_per_allreduce=per_round("bytes_sent") / args.workers,
            goodput=args.numel * figures["lane_bits"] // 8 * args.workers
            / per_round("bytes_sent"))
        _stop_popen(switch)

        # 2. The raw ZeroMQ ceiling.
        if not args.skip_zmq:
            spec = make(endpoint("relay"))
            ctx = mp.get_context("spawn")
            ready, stop = ctx.Event(), ctx.Event()
            relay = ctx.Process(target=bw.relay, args=(spec, ready, stop), daemon=True,
                                name="bench-relay")
            stack.callback(_stop_processes, [relay])
            stack.callback(stop.set)
            relay.start()
            if not ready.wait(60):
                raise BenchError(f"the relay did not bind {spec.address} within 60 s")
            reports = _phase("zmq ceiling", bw.relay_worker, spec, args.timeout, stack,
                             lambda: None if relay.is_alive() else "the relay exited")
            relay_cpu = _cpu_seconds(relay.pid) / rounds_run
            seconds, rounds, worker_cpu = _median_round(reports)
            figures.update(zmq_ceiling_seconds=seconds, zmq_ceiling_rounds_s=rounds,
                           zmq_ceiling_worker_cpu_s=worker_cpu, zmq_ceiling_relay_cpu_s=relay_cpu,
                           zmq_ceiling_ate_per_s=args.numel / seconds)
            stop.set()
        # 3. gloo (over the links: rank 0's address in its namespace, a port free there).
        if not args.skip_gloo:
            rendezvous = _free_tcp() if net is None else f"tcp://{net.worker_ip(0)}:29500"
            reports = _phase("gloo", bw.gloo_worker, make(rendezvous), args.timeout, stack)
            seconds, rounds, worker_cpu = _median_round(reports)
            figures.update(gloo_seconds=seconds, gloo_rounds_s=rounds, gloo_worker_cpu_s=worker_cpu,
                           gloo_ate_per_s=args.numel / seconds)
    ate = figures["ate_per_s"]
    figures["ate_vs_gloo"] = ate / figures["gloo_ate_per_s"] if "gloo_ate_per_s" in figures \
        else None
    figures["ate_vs_zmq_ceiling"] = (ate / figures["zmq_ceiling_ate_per_s"]
                                     if "zmq_ceiling_ate_per_s" in figures else None)
    figures.setdefault("gloo_ate_per_s", None)
    figures.setdefault("zmq_ceiling_ate_per_s", None)
    limit = figures.get("link_limit_ate_per_s")
    if limit:
        n = args.workers
        figures["ate_vs_link_limit"] = ate / limit
        # A ring all-reduce sends and receives 2(n-1)/n of the tensor per worker: its ceiling.
        figures["gloo_link_ceiling_ate_per_s"] = limit * n / (2 * (n - 1))
        figures["gloo_vs_link_limit"] = (figures["gloo_ate_per_s"] / limit
                                         if figures["gloo_ate_per_s"] else None)
    for key in ("ate_vs_link_limit", "gloo_link_ceiling_ate_per_s", "gloo_vs_link_limit"):
        figures.setdefault(key, None)
    return figures


def _table(f: dict[str, Any]) -> str:
    mib = f["numel"] * 4 / (1 << 20)
    lines = [
        f"switchagg bench: {f['workers']} workers, {f['numel']} int32 ({mib:.4g} MiB), "
        f"{f.get('lane_bits', 32)}-bit lanes, k={f['k']}, slots {f['slots']}, burst {f['burst']} ({f['message_bytes'] >> 10} KiB per "
        f"message), {f['transport']}, {f['cores']} cores, {f['pipes']} pipe(s), drop "
        f"{f['drop']} duplicate "
        f"{f['duplicate']} reorder {f['reorder']}, median of {f['repeats']}",
        f"{'contender':<34}{'s/all-reduce':>13}{'M elem/s':>10}",
    ]
    rows = [("switch (SwitchClient), ATE/s", f.get("seconds_per_allreduce"), f["ate_per_s"]),
            ("ZeroMQ ceiling (relay, no sum)", f.get("zmq_ceiling_seconds"),
             f["zmq_ceiling_ate_per_s"]),
            ("torch.distributed gloo", f.get("gloo_seconds"), f["gloo_ate_per_s"])]
    for name, seconds, rate in rows:
        if rate is not None:
            lines.append(f"{name:<34}{seconds:>13.4f}{rate / 1e6:>10.2f}")
    cpu = [f"switch {f['switch_cpu_s']:.2f} + workers {f['worker_cpu_s']:.2f}"]
    if f["zmq_ceiling_ate_per_s"] is not None:
        cpu.append(f"relay {f['zmq_ceiling_relay_cpu_s']:.2f} + workers "
                   f"{f['zmq_ceiling_worker_cpu_s']:.2f}")
    if f["gloo_ate_per_s"] is not None:
        cpu.append(f"gloo workers {f['gloo_worker_cpu_s']:.2f}")
    lines.append(f"CPU s per all-reduce ({f['cores']} cores): " + "; ".join(cpu))
    lines.append(f"switch start-up (before the timed rounds, not in them): "
                 f"{f['switch_startup_s']:.2f} s wall, {f['switch_startup_cpu_s']:.2f} s CPU")
    calls = f["call_s"]
    lines.append(f"switch call latency over {f['repeats']} calls: median "
                 f"{calls['median'] * 1e3:.1f} ms, p90 {calls['p90'] * 1e3:.1f}, p99 "
                 f"{calls['p99'] * 1e3:.1f}, max {calls['max'] * 1e3:.1f} "
                 f"({calls['max_over_median']:.2f}x the median)")
    lines.append(f"switch: {f['packets_per_s'] / 1e6:.2f} M packets/s in, "
                 f"{f['bytes_sent_per_allreduce'] / 1e6:.2f} MB sent per worker per all-reduce, "
                 f"goodput {f['goodput']:.3f} (payload / wire bytes), {f['retransmitted']} "
                 "retransmitted")
    if f.get("link"):
        n = f["workers"]
        lines.append(f"link {f['link']} each way per worker: link limit (a perfect switch) "
                     f"{f['link_limit_ate_per_s'] / 1e6:.2f} M elem/s, a ring's ceiling "
                     f"(x n/(2(n-1)) = {n / (2 * (n - 1)):.2f}) "
                     f"{f['gloo_link_ceiling_ate_per_s'] / 1e6:.2f}; switch = "
                     f"{f['ate_vs_link_limit']:.2f} x link limit"
                     + (f", gloo = {f['gloo_vs_link_limit']:.2f} x link limit"
                        if f.get("gloo_vs_link_limit") is not None else ""))
    ratios = [f"ate/gloo = {f['ate_vs_gloo']:.2f}" if f["ate_vs_gloo"] is not None else "",
              f"ate/zmq ceiling = {f['ate_vs_zmq_ceiling']:.2f}"
              if f["ate_vs_zmq_ceiling"] is not None else ""]
    if any(ratios):
        lines.append("ratios: " + ", ".join(r for r in ratios if r))
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table or JSON; returns 0, 1 (run failed) or 2 (bad options)."""
    from switchagg.workers import validate
    try:
        validate.check_bench(args)
    except validate.UsageError as exc:
        return validate.report_usage("bench", exc)
    if args.quantize:
        return _quantize(args)
    # SIGTERM unwinds like Ctrl-C, so that children, namespaces and folders are removed. SIGINT
    # is installed too: a process started in the background of a script inherits it ignored,
    # while its switch child (which installs its own) would stop, and the run fail, on Ctrl-C.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.sweep:
            if args.link:
                parse_rate(args.link)
                check_can_build()
            return _bench_sweep.main(args, run_bench)
        figures = run_bench(args)
    except (ValueError, LinkError) as exc:
        print(f"switchagg bench: {exc}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"switchagg bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("switchagg bench: interrupted; children stopped", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps(figures, sort_keys=True) if args.json else _table(figures))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    """`--quantize`: the kernels' figures from workers/bench_quantize.py, printed as it does."""
    from switchagg.kernels import DeviceUnavailable
    from switchagg.workers import bench_quantize

    try:
        result = bench_quantize.run_quantize_bench(args.numel, args.device, args.repeats)
    except DeviceUnavailable as exc:
        print(f"switchagg bench --quantize: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        bench_quantize._print_table(result)
    return 0
