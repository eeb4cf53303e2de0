"""Throughput of the switch process's front: `python -m switch_emulator.bench [--workers 4 ...]`.

What it measures: N raw worker processes (DEALER sockets, no client library, no quantization) stream
bursts of B packets of k int32 through a switch running in this process, each keeping W bursts in
flight (self-clocked on results). It prints the aggregated elements/s (length of the reduced vector
per second) and the switch's CPU time per burst, split into the dataplane's `receive` and the rest
(the front: poll, receive, admit, parse, validate, fan-out sends). What it must never do: assert a
figure; it prints them (README.md's benchmark section gives the machine's ceilings to compare against).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import zmq

from switch_emulator._config import SwitchConfig
from switch_emulator.server import SwitchServer
from switchagg.packet import Kind, make_burst, packet_bytes
from switchagg.protocol import (FRAME_CONTROL, FRAME_DATA, Join, JoinOk, Leave, Ready, decode_control,
                                encode_control)

__all__ = ["main"]


def _worker(endpoint: str, n: int, k: int, burst: int, window: int, rounds: int, out) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    slots = burst * window
    sock.send_multipart([FRAME_CONTROL, encode_control(Join("bench", n, k, slots))])
    for expected in (JoinOk, Ready):
        if not sock.poll(10_000):
            raise TimeoutError(f"no {expected.TYPE} from the switch within 10 s")
        message = decode_control(sock.recv_multipart()[1])
        if isinstance(message, JoinOk):
            job, rank = message.job_id, message.rank
        assert isinstance(message, expected), message
    values = np.random.default_rng(rank).integers(-1000, 1000, (burst, k), dtype=np.int32)
    bursts = [make_burst(Kind.DATA, job, rank, np.arange(burst) + b * burst, np.zeros(burst, int),
                         np.arange(burst) + b * burst, values) for b in range(window)]
    sent = done = 0
    for b in range(window):
        sock.send_multipart([FRAME_DATA, bursts[b]], copy=False)
        sent += 1
    start = time.perf_counter()
    # Every worker sends the same number of bursts: a job's slot completes only when all contribute.
    while sent < rounds:
        if not sock.poll(5_000):
            raise TimeoutError("no result from the switch within 5 s")
        sock.recv_multipart(copy=False)
        # The result of window slot w frees it: send the next round on it, other version.
        w = done % window
        version = (done // window + 1) % 2
        bursts[w]["pool_index"] = (version << 15) | (np.arange(burst) + w * burst)
        bursts[w]["chunk"] += slots
        sock.send_multipart([FRAME_DATA, bursts[w]], copy=False)
        sent += 1
        done += 1
    for _ in range(window):  # the results still in flight
        if not sock.poll(5_000):
            raise TimeoutError("no result from the switch within 5 s")
        sock.recv_multipart(copy=False)
        done += 1
    elapsed = time.perf_counter() - start
    sock.send_multipart([FRAME_CONTROL, encode_control(Leave(job, rank))])
    out.put((done, elapsed))
    sock.close(linger=1000)
    ctx.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m switch_emulator.bench", description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--burst", type=int, default=1024, help="packets per ZeroMQ message")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--window", type=int, default=2, help="bursts in flight per worker")
    parser.add_argument("--rounds", type=int, default=1000, help="bursts each worker sends")
    parser.add_argument("--dataplane", default="fast", choices=("fast", "golden"))
    args = parser.parse_args(argv)

    endpoint = f"ipc:///tmp/switch-bench-{os.getpid()}.sock"
    server = SwitchServer(SwitchConfig(bind=endpoint, stats_interval=0, dataplane=args.dataplane,
                                       log_level="WARNING"))
    server.bind()
    receive_time, receive_calls = [0.0], [0]
    original = server.control.dataplane_factory

    def timed(inner):
        def call(*args):
            t = time.perf_counter()
            try:
                return inner(*args)
            finally:
                receive_time[0] += time.perf_counter() - t
                receive_calls[0] += 1
        return call

    def timed_factory(n: int, s: int, k: int):
        dp = original(n, s, k)
        dp.receive = timed(dp.receive)
        if hasattr(dp, "receive_checked"):  # the server's path without ingress loss
            dp.receive_checked = timed(dp.receive_checked)
        return dp
    server.control.dataplane_factory = timed_factory

    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    results: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_worker, args=(endpoint, args.workers, args.k, args.burst,
                                              args.window, args.rounds, results))
             for _ in range(args.workers)]
    cpu0 = time.process_time()
    thread.start()
    for p in procs:
        p.start()
    runs = [results.get(timeout=120) for _ in procs]
    cpu = time.process_time() - cpu0
    stop.set()
    thread.join(timeout=10)
    for p in procs:
        p.join(timeout=10)
    bursts_in = max(receive_calls[0], 1)
    elements = min(done for done, _ in runs) * args.burst * args.k
    seconds = max(elapsed for _, elapsed in runs)
    print(f"cores={os.cpu_count()} workers={args.workers} burst={args.burst} k={args.k} "
          f"({args.burst * packet_bytes(args.k) >> 10} KiB/message) window={args.window} "
          f"dataplane={args.dataplane}")
    print(f"aggregated: {elements / seconds / 1e6:.1f} M int32 elements/s "
          f"({min(d for d, _ in runs)} bursts per worker in {seconds:.2f} s)")
    print(f"switch process CPU per burst in: {cpu / bursts_in * 1e6:.0f} us "
          f"(dataplane.receive {receive_time[0] / bursts_in * 1e6:.0f} us; the rest is the front, "
          f"ZeroMQ IO thread and {args.workers} sends of each result)")


if __name__ == "__main__":
    main()
