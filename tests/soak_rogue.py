"""Soak: 4 honest workers beside a rogue peer, against one switch process, for N minutes.

Not part of the test suite (it runs for minutes; pytest does not collect it). Run it by hand:

    PYTHONPATH=. python tests/soak_rogue.py --minutes 10

The rogue, in a loop and never reading what the switch sends it: random control frames (bytes,
JSON of every type with random fields, the crash frames of issue 15), random data frames, JOINs of
fresh jobs (which it leaves, or abandons to the join timeout), JOINs into the honest jobs (which
carry a job token: refused), and a one-worker job it floods with bursts. The honest workers all-reduce
random-length vectors in a loop and check every sum against the exact one; their job (with a job
token) is running before the rogue starts. Every 5 s the monitor
samples the switch's RSS and asks it (`--probe`'s summary) for its counters. The script prints one
JSON line of figures (the RSS every 30 s among them) and exits 0 if every honest all-reduce was
exact, none failed, the switch is alive and its RSS stayed under --rss-bound-mib. To see what holds
the switch's memory, run with SWITCHAGG_TRACEMALLOC=FILE (switch_emulator/_memtrace.py; it slows
the switch several times); --switch-args passes more options to it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shlex
import socket
import subprocess
import sys
import time

import numpy as np
import zmq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from switch_emulator.probe import probe  # noqa: E402
from switchagg import ClientConfig, SwitchClient, SwitchError  # noqa: E402
from switchagg.packet import Kind, make_burst  # noqa: E402
from switchagg.protocol import (FRAME_CONTROL, FRAME_DATA, Heartbeat, Join,  # noqa: E402
                                Leave, encode_control)

WORLD = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def vector(step: int, rank: int, numel: int) -> np.ndarray:
    rng = np.random.default_rng([step, rank])
    return rng.integers(-2**31, 2**31, numel, dtype=np.int64).astype(np.int32)


def honest(address: str, rank: int, deadline: float, out) -> None:
    """All-reduce random lengths until the deadline; check each sum; report counts.

    Each vector carries one more element, 1 while this rank is before the deadline: the ranks stop
    together, at the first step whose flags do not sum to WORLD (none is left waiting in a call).
    """
    calls = exact = failures = 0
    worst = 0.0
    config = ClientConfig(k=64, slots=2048, burst=256, join_timeout=60, op_timeout=30)
    generation = 0
    while time.time() < deadline:
        try:
            with SwitchClient(address, f"honest-{generation}", WORLD, rank, config=config,
                              token="honest-secret") as c:
                step = 0
                while True:
                    numel = int(np.random.default_rng(step).integers(1, 200_000))
                    mine = np.append(vector(step, rank, numel), np.int32(time.time() < deadline))
                    start = time.perf_counter()
                    got = c.allreduce(mine, call=step)
                    worst = max(worst, time.perf_counter() - start)
                    expected = np.zeros(numel, np.int32)
                    for r in range(WORLD):
                        np.add(expected, vector(step, r, numel), out=expected)
                    calls += 1
                    exact += bool(np.array_equal(got[:-1], expected))
                    step += 1
                    if got[-1] != WORLD:
                        break
                break
        except SwitchError as exc:
            failures += 1
            print(f"honest rank {rank}: {exc!r}", file=sys.stderr, flush=True)
            generation += 1
    out.put({"rank": rank, "calls": calls, "exact": exact, "failures": failures,
             "slowest_call_s": round(worst, 3)})


def rogue(address: str, deadline: float, out) -> None:
    """Everything at once, never reading."""
    ctx = zmq.Context()
    rnd = random.Random(7)
    rng = np.random.default_rng(7)
    sent = {"control": 0, "data": 0, "joins": 0, "floods": 0, "reconnects": 0}
    crash = [b'{"type":"JOIN","job":' + b"[" * 5000 + b"]" * 5000 + b"}",
             b'{"type":"JOIN","job":"j","world_size":' + b"9" * 5000 + b',"k":8,"slots":16}',
             json.dumps({"type": "JOIN", "job": "j", "world_size": 2, "k": 8, "slots": 16,
                         "token": "t\u00f6ken"}).encode()]
    types = ["JOIN", "LEAVE", "HEARTBEAT", "STATS", "QUERY", "ERROR", "ABORT", "JOIN_OK", "X"]
    fields = ["job", "world_size", "k", "slots", "token", "rank", "job_id", "slots", "versions"]
    values = [None, True, -1, 0, 1, 2**40, 1e308, "x" * 200, "honest-0", [1, [2]], {"a": 1}]

    def fresh():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)      # it never reads: let the switch's queue fill
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(address)
        return sock

    sock = fresh()
    flood_job = None
    i = 0
    while time.time() < deadline:
        i += 1
        try:
            choice = rnd.random()
            if choice < 0.3:
                body = {"type": rnd.choice(types)}
                for _ in range(rnd.randrange(6)):
                    body[rnd.choice(fields)] = rnd.choice(values)
                frame = json.dumps(body).encode() if rnd.random() < 0.8 else rng.bytes(64)
                sock.send_multipart([FRAME_CONTROL, frame], zmq.NOBLOCK)
                sent["control"] += 1
            elif choice < 0.35:
                sock.send_multipart([FRAME_CONTROL, rnd.choice(crash)], zmq.NOBLOCK)
                sent["control"] += 1
            elif choice < 0.5:
                raw = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8)
                sock.send_multipart([FRAME_DATA, raw.tobytes()], zmq.NOBLOCK)
                sent["data"] += 1
            elif choice < 0.6:
                name = rnd.choice(["honest-0", f"squat-{i % 50}"])  # honest-0 has a token
                join = {"type": "JOIN", "job": name, "world_size": rnd.choice([1, 2, 4, 64]),
                        "k": 64, "slots": rnd.choice([16, 2048, 16384]),
                        "rank": rnd.choice([None, 0, 3])}  # raw: invalid ones go out too
                sock.send_multipart([FRAME_CONTROL, json.dumps(join).encode()], zmq.NOBLOCK)
                sent["joins"] += 1
            elif choice < 0.65:
                sock.send_multipart([FRAME_CONTROL, encode_control(Leave(0, 0, ""))], zmq.NOBLOCK)
                sock.close()
                sock = fresh()
                flood_job = None
                sent["reconnects"] += 1
            else:
                if flood_job is None:
                    sock.send_multipart([FRAME_CONTROL, encode_control(
                        Join(f"flood-{i}", 1, 64, 4096))], zmq.NOBLOCK)
                    flood_job = 0  # it cannot read its job id: guess the low ones
                jid = int(rng.integers(0, 8))
                chunks = np.arange(i * 1024, (i + 1) * 1024)
                burst = make_burst(Kind.DATA, jid, 0, chunks % 4096, (chunks // 4096) % 2,
                                   chunks, np.ones((1024, 64), np.int32))
                sock.send_multipart([FRAME_DATA, burst], zmq.NOBLOCK, copy=False)
                if i % 10 == 0:
                    sock.send_multipart([FRAME_CONTROL, encode_control(Heartbeat(jid, 0))],
                                        zmq.NOBLOCK)
                sent["floods"] += 1
        except zmq.Again:
            time.sleep(0.01)
        if i % 50 == 0:
            time.sleep(0.005)  # leave the honest workers some of the two cores
    sock.close()
    ctx.term()
    out.put({"rogue": sent})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rss-bound-mib", type=float, default=1024.0,
                        help="fail if the switch's RSS ever exceeds this")
    parser.add_argument("--switch-args", default="",
                        help="more switch-emulator options, e.g. '--hwm 1000' (one string)")
    args = parser.parse_args()
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    switch = subprocess.Popen(
        [sys.executable, "-m", "switch_emulator", "--bind", address, "--log-level", "ERROR",
         "--liveness-timeout", "5", "--heartbeat-interval", "0.5", "--join-timeout", "10",
         "--peer-queue-bytes", str(16 << 20), "--stats-interval", "0",
         *shlex.split(args.switch_args)], env=env)
    try:
        for _ in range(300):
            try:
                probe(address, timeout=0.5)
                break
            except SwitchError:
                time.sleep(0.1)
        start = time.time()
        deadline = start + 60 * args.minutes
        out: mp.Queue = mp.Queue()
        procs = [mp.Process(target=honest, args=(address, r, deadline, out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        # The honest job runs before the rogue arrives (a long job on a shared switch): on one
        # host, the rogue would otherwise share its slot quota and race it for the job's name.
        while probe(address, timeout=5).get("jobs_active", 0) < 1:
            time.sleep(0.2)
        procs.append(mp.Process(target=rogue, args=(address, deadline, out)))
        procs[-1].start()
        rss, stats = [], {}
        while time.time() < deadline and switch.poll() is None:
            time.sleep(5)
            rss.append(rss_mib(switch.pid))
            try:
                stats = probe(address, timeout=5)
            except SwitchError as exc:
                print(f"probe failed: {exc}", file=sys.stderr)
        reports = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        workers = [r for r in reports if "rank" in r]
        figures = {
            "minutes": args.minutes,
            "honest_calls": sum(r["calls"] for r in workers) // WORLD,
            "honest_exact": all(r["exact"] == r["calls"] for r in workers),
            "honest_failures": sum(r["failures"] for r in workers),
            "slowest_call_s": max(r["slowest_call_s"] for r in workers),
            "rogue": next(r["rogue"] for r in reports if "rogue" in r),
            "switch_alive": switch.poll() is None,
            "rss_mib_first": rss[0] if rss else None, "rss_mib_max": max(rss) if rss else None,
            "rss_mib_last": rss[-1] if rss else None,
            "rss_mib_every_30s": [round(v) for v in rss[::6]],
            "switch": {key: stats.get(key) for key in (
                "malformed", "control_errors", "unknown_sender", "joins", "jobs_created",
                "jobs_aborted", "jobs_expired", "internal_errors", "mispaired")},
        }
        print(json.dumps(figures))
        ok = (figures["honest_exact"] and figures["honest_failures"] == 0
              and figures["switch_alive"] and (figures["rss_mib_max"] or 0) < args.rss_bound_mib)
        return 0 if ok else 1
    finally:
        switch.terminate()
        switch.wait(10)


if __name__ == "__main__":
    sys.exit(main())
