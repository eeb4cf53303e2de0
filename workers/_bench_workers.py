"""The process bodies of `switchagg bench`: one worker of each contender, and the raw ZeroMQ relay.

What it owns: what runs inside each child process of the benchmark (workers/bench.py starts them
and reads their reports): a switch worker (`SwitchClient.allreduce`), a relay worker and the relay
itself (the raw ZeroMQ fan-in/fan-out ceiling), and a gloo worker (`torch.distributed.all_reduce`).
What it must never do: wait without a bound, report a figure for a wrong sum, or import torch
outside the gloo worker (the other children stay light).

How it works: every worker runs the same protocol, so the three figures compare like with like:
  1. set up (connect, join, allocate and pre-fault every buffer it will touch, compute the exact
     expected sum of every rank's input);
  2. for each of `warmup` untimed rounds and then `repeats` timed ones: prepare the round (outside
     the clock), wait on the phase's start barrier, time the all-reduce alone, then verify it;
  3. put one report on the result queue: ("ok", rank, {"times": [...], ...}) or ("error", rank,
     text). A wrong sum is an error, never a figure.
The parent takes, per round, the slowest worker's time (an all-reduce is done when every worker
has its result) and reports the median round.

Inputs: rank r holds x_r[i] = (i * m_r + r) mod 2^32 viewed as int32 with an odd multiplier m_r, so
values span the whole int32 range, sums wrap, and every rank can compute the expected sum alone.

The relay (the ceiling): a ROUTER with the switch's socket options and framing, `[identity,
FRAME_DATA, header words, payloads]` (the split layout the switch client sends and the switch
answers with), that counts each message's arrivals from the N workers and, on the N-th, sends the
last-arriving two frames back to every worker (one send per worker, zero-copy, as the switch
multicasts). It adds nothing. Relay workers send the same message sizes as the switch workers (a
burst of B packets: B x 16 header bytes and B x 4k payload bytes), self-clocked with the same
window (slots / B messages in flight), from pre-built buffers; the header frame's first 8 bytes
carry a running message number so that the relay can key on it and the worker can check that
every reply answers the right message.
"""

from __future__ import annotations

import dataclasses
import struct
import time
import traceback
from typing import Any, Callable

import numpy as np
import zmq

from switchagg.packet import HEADER_BYTES
from switchagg.protocol import FRAME_CONTROL, FRAME_DATA

__all__ = ["Spec", "bench_input", "expected_sum", "gloo_worker", "relay", "relay_worker",
           "switch_worker"]

#: Seconds any one blocking step of a child may take (join, barrier, one all-reduce) before it
#: gives up with an error; the parent bounds the whole phase separately.
STEP_TIMEOUT = 120.0
#: The relay's and the relay workers' high-water marks: the switch's default (SwitchConfig.hwm).
HWM = 100_000
_HELLO, _READY, _BYE = b"hello", b"ready", b"bye"
_COUNTER = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every child of one phase needs to know (picklable: children are spawned).

    Attributes:
        address: the switch's or the relay's ZeroMQ endpoint, or the gloo rendezvous
            ("tcp://127.0.0.1:PORT").
        workers: world size N.
        numel: int32 elements per all-reduce.
        k, slots, burst: packet size, slot pool, packets per ZeroMQ message.
        warmup, repeats: untimed and timed all-reduces.
        netns: "" on the host; else the tag of a `_netns_links.LinkNetwork`: rank r runs in
            namespace `<netns>-w<r>`, the relay in `<netns>-sw`, and `address` may name the
            rank's own gateway as `{rank}` (formatted by `address_for`).
    """

    address: str
    workers: int
    numel: int
    k: int
    slots: int
    burst: int
    warmup: int
    repeats: int
    netns: str = ""

    def address_for(self, rank: int) -> str:
        return self.address.format(rank=rank)

    @property
    def window(self) -> int:
        """Messages in flight per worker: what the switch client's window admits."""
        return max(1, self.slots // self.burst)


def bench_input(rank: int, numel: int) -> np.ndarray:
    """Rank `rank`'s input: all over the int32 range, cheap to build, different for every rank."""
    multiplier = np.uint32((0x9E3779B1 * (2 * rank + 1)) & 0xFFFFFFFF)  # odd: a bijection
    x = np.arange(numel, dtype=np.uint32)
    x *= multiplier
    x += np.uint32(rank)
    return x.view(np.int32)


def expected_sum(workers: int, numel: int) -> np.ndarray:
    """The exact wrapping int32 sum of every rank's `bench_input` (numpy's int32 add wraps)."""
    total = np.zeros(numel, np.int32)
    for r in range(workers):
        np.add(total, bench_input(r, numel), out=total)
    return total


def _verify(result: np.ndarray, expected: np.ndarray, what: str) -> None:
    if result.shape != expected.shape or not np.array_equal(result, expected):
        wrong = (np.flatnonzero(result != expected) if result.shape == expected.shape
                 else np.array([-1]))
        raise AssertionError(f"{what} returned a wrong sum: shape {result.shape} vs "
                             f"{expected.shape}, {len(wrong)} wrong elements, first at index "
                             f"{int(wrong[0])}")


def _rounds(spec: Spec, barrier, prepare: Callable[[], None], run: Callable[[], Any],
            verify: Callable[[Any], None]) -> tuple[list[float], list[float]]:
    """Step 2 of the module essay: untimed warm-up rounds, then timed ones.

    Returns:
        (wall seconds, CPU seconds of this process, all its threads) of each timed round.
    """
    times, cpu = [], []
    for i in range(spec.warmup + spec.repeats):
        prepare()
        barrier.wait(STEP_TIMEOUT)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = run()
        elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
        verify(out)
        if i >= spec.warmup:
            times.append(elapsed)
            cpu.append(used)
    return times, cpu


def _enter_netns(spec: Spec, name: str) -> None:
    """Join the run's network namespace `<netns>-<name>` (before any socket exists)."""
    if spec.netns:
        from switchagg.workers._netns_links import enter

        enter(f"{spec.netns}-{name}")


def _report(queue, rank: int, body: Callable[[], dict], spec: Spec | None = None) -> None:
    """Run a worker body (in its namespace, if any) and put its report (or its error) on the
    queue; never raises."""
    try:
        if spec is not None:
            _enter_netns(spec, f"w{rank}")
        queue.put(("ok", rank, body()))
    except BaseException as exc:  # noqa: BLE001 - the parent must hear of every failure
        detail = traceback.format_exc(limit=6)
        queue.put(("error", rank, f"{type(exc).__name__}: {exc}\n{detail}"))


# ---- the switch ------------------------------------------------------------------------------

def switch_worker(spec: Spec, rank: int, barrier, queue) -> None:
    """One rank all-reducing through the emulated switch with `SwitchClient`."""
    def body() -> dict:
        from switchagg import ClientConfig, SwitchClient

        values = bench_input(rank, spec.numel)
        expected = expected_sum(spec.workers, spec.numel)
        config = ClientConfig(k=spec.k, slots=spec.slots, burst=spec.burst,
                              join_timeout=STEP_TIMEOUT, op_timeout=STEP_TIMEOUT)
        # The sums land in a buffer allocated and page-faulted here, as gloo's land in its tensor.
        out = np.zeros(spec.numel, np.int32)
        out.fill(-1)
        with SwitchClient(spec.address_for(rank), "bench", spec.workers, rank=rank, config=config) as c:
            before = {}

            def prepare() -> None:
                out.fill(0)  # so that a chunk left unwritten cannot pass as the last round's sum
                before.update(c.stats().as_dict())

            counted: list[dict] = []

            def verify(out: np.ndarray) -> None:
                _verify(out, expected, f"rank {rank}'s switch all-reduce")
                after = c.stats().as_dict()
                counted.append({key: after[key] - before[key] for key in
                                ("packets_sent", "bytes_sent", "retransmitted", "packets_received",
                                 "bytes_received")})

            times, cpu = _rounds(spec, barrier, prepare, lambda: c.allreduce(values, out=out),
                                 verify)
        timed = counted[spec.warmup:]
        return {"times": times, "cpu": cpu, **{key: sum(r[key] for r in timed) for key in timed[0]}}

    _report(queue, rank, body, spec)


# ---- the raw ZeroMQ ceiling ------------------------------------------------------------------

def relay(spec: Spec, ready, stop) -> None:
    """The ceiling's switch: fan-in N messages, fan the last one out to all N; no summing.

    Runs until every worker said bye, `stop` is set, or nothing arrives for STEP_TIMEOUT.
    `ready` is set once the socket is bound.
    """
    _enter_netns(spec, "sw")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    for option, value in ((zmq.SNDHWM, HWM), (zmq.RCVHWM, HWM), (zmq.ROUTER_MANDATORY, 1),
                          (zmq.LINGER, 500)):
        sock.setsockopt(option, value)
    # In a link run the relay listens on every port of the switch's namespace.
    sock.bind(spec.address if not spec.netns else "tcp://0.0.0.0:" + spec.address.rsplit(":", 1)[1])
    ready.set()
    window = spec.window
    members: list[bytes] = []
    count = np.zeros(window, np.int64)
    number = np.full(window, -1, np.int64)
    byes = 0
    quiet_since = time.monotonic()
    try:
        while not stop.is_set() and byes < spec.workers:
            if not sock.poll(100):
                if time.monotonic() - quiet_since > STEP_TIMEOUT:
                    return
                continue
            quiet_since = time.monotonic()
            for _ in range(256):  # drain, as the switch's loop does (server.MAX_BATCH)
                try:
                    identity, kind, *bodies = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                body = bodies[-1]
                if kind.bytes == FRAME_DATA:
                    n = _COUNTER.unpack_from(bodies[0].buffer)[0]
                    w = n % window
                    if number[w] != n:
                        number[w], count[w] = n, 0
                    count[w] += 1
                    if count[w] == spec.workers:
                        for member in members:
                            sock.send_multipart([member, FRAME_DATA, *bodies], zmq.NOBLOCK,
                                                copy=False)
                elif body.bytes == _HELLO:
                    members.append(identity.bytes)
                    if len(members) == spec.workers:
                        for member in members:
                            sock.send_multipart([member, FRAME_CONTROL, _READY])
                elif body.bytes == _BYE:
                    byes += 1
    finally:
        sock.close(linger=500)
        ctx.term()


def relay_worker(spec: Spec, rank: int, barrier, queue) -> None:
    """One rank streaming the switch workers' message sizes through the relay."""
    def body() -> dict:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        for option, value in ((zmq.SNDHWM, 10_000), (zmq.RCVHWM, 10_000), (zmq.LINGER, 500)):
            sock.setsockopt(option, value)
        sock.connect(spec.address_for(rank))
        try:
            sock.send_multipart([FRAME_CONTROL, _HELLO])
            if not sock.poll(int(STEP_TIMEOUT * 1000)):
                raise TimeoutError(f"the relay at {spec.address} sent no READY within "
                                   f"{STEP_TIMEOUT:.0f}s")
            sock.recv_multipart()
            chunks = -(-spec.numel // spec.k)
            sizes = [min(spec.burst, chunks - m * spec.burst)
                     for m in range(-(-chunks // spec.burst))]
            window = spec.window
            # Pre-built, pre-faulted send buffers (ones, not zeros: zero pages may stay shared).
            ring = [(np.ones(spec.burst * HEADER_BYTES, np.uint8),
                     np.ones(spec.burst * 4 * spec.k, np.uint8)) for _ in range(window)]
            pay = 4 * spec.k
            state = {"next": 0}  # the running message number, across all-reduces

            def run() -> int:
                first, sent, done = state["next"], 0, 0
                while done < len(sizes):
                    while sent < len(sizes) and sent - done < window:
                        heads, vals = ring[(first + sent) % window]
                        _COUNTER.pack_into(heads, 0, first + sent)
                        n = sizes[sent]
                        sock.send_multipart([FRAME_DATA, heads[:n * HEADER_BYTES], vals[:n * pay]],
                                            copy=False)
                        sent += 1
                    if not sock.poll(int(STEP_TIMEOUT * 1000)):
                        raise TimeoutError(f"no reply from the relay within {STEP_TIMEOUT:.0f}s")
                    _, heads, vals = sock.recv_multipart(copy=False)
                    got = _COUNTER.unpack_from(heads.buffer)[0]
                    if got != first + done or len(vals.buffer) != sizes[done] * pay:
                        raise AssertionError(f"relay reply for message {got} ({len(vals.buffer)} "
                                             f"B), expected {first + done} "
                                             f"({sizes[done] * pay} B)")
                    done += 1
                state["next"] = first + done
                return done

            def verify(done: int) -> None:
                if done != len(sizes):
                    raise AssertionError(f"{done} of {len(sizes)} replies")

            times, cpu = _rounds(spec, barrier, lambda: None, run, verify)
            sock.send_multipart([FRAME_CONTROL, _BYE])
            return {"times": times, "cpu": cpu, "messages": len(sizes)}
        finally:
            sock.close(linger=500)
            ctx.term()

    _report(queue, rank, body, spec)


# ---- gloo ------------------------------------------------------------------------------------

def gloo_worker(spec: Spec, rank: int, barrier, queue) -> None:
    """One rank of torch.distributed gloo `all_reduce(SUM)` of the same int32 tensor."""
    def body() -> dict:
        import datetime
        import os

        if spec.netns:  # gloo must use the shaped link, not guess an interface from the host name
            os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # one process per core share, like the other contenders
        values = torch.from_numpy(bench_input(rank, spec.numel))
        expected = expected_sum(spec.workers, spec.numel)
        tensor = values.clone()
        dist.init_process_group("gloo", init_method=spec.address, rank=rank,
                                world_size=spec.workers,
                                timeout=datetime.timedelta(seconds=STEP_TIMEOUT))
        try:
            def run() -> torch.Tensor:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                return tensor

            times, cpu = _rounds(spec, barrier, lambda: tensor.copy_(values), run,
                                 lambda t: _verify(t.numpy(), expected,
                                                   f"rank {rank}'s gloo all_reduce"))
        finally:
            dist.destroy_process_group()
        return {"times": times, "cpu": cpu}

    _report(queue, rank, body, spec)

