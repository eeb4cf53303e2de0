"""The switch process over real ZeroMQ sockets, driven by raw DEALER workers speaking the protocol.

The server runs in a thread (one per test) except for the signal test, which runs `switch-emulator`
as a child process. Every socket has linger 0, every receive a poll timeout, every test a cap.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import zmq

from switchagg.packet import (Kind, join_split, make_burst, packet_bytes, parse_burst, parse_split,
                              split_burst, validate_burst)
from switchagg.protocol import (FRAME_CONTROL, FRAME_DATA, Abort, ControlMessage, Error, Heartbeat,
                                HeartbeatAck, Join, JoinOk, Leave, Ready, StatsReply, StatsRequest,
                                decode_control, encode_control)
from tests.conftest import PYTHON, free_port

pytestmark = pytest.mark.timeout(30)

K = 8


class RawWorker:
    """A DEALER socket and the protocol's framing, nothing more."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.job_id = -1
        self.rank = -1

    def send(self, message: ControlMessage) -> None:
        self.sock.send_multipart([FRAME_CONTROL, encode_control(message)])

    def recv(self, timeout: float = 3.0) -> tuple[bytes, bytes]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"nothing received within {timeout} s")
        frames = self.sock.recv_multipart()
        assert len(frames) == 2, frames
        return frames[0], frames[1]

    def control(self, cls: type = ControlMessage, timeout: float = 3.0) -> ControlMessage:
        kind, body = self.recv(timeout)
        assert kind == FRAME_CONTROL, (kind, body[:40])
        message = decode_control(body)
        assert isinstance(message, cls), message
        return message

    def results(self, timeout: float = 3.0) -> np.ndarray:
        kind, body = self.recv(timeout)
        assert kind == FRAME_DATA, decode_control(body)
        packets, trailing = parse_burst(body, K)
        assert trailing == 0
        ok, bad = validate_burst(packets, kind=Kind.RESULT, job=self.job_id, worker=None,
                                 slots=1 << 15)
        assert ok.all(), bad
        return packets

    def join(self, job: str, n: int, slots: int = 64, rank: int | None = None) -> JoinOk:
        self.send(Join(job, n, K, slots, "", rank))
        ok = self.control(JoinOk)
        self.job_id, self.rank = ok.job_id, ok.rank
        return ok

    def send_burst(self, chunks: np.ndarray, values: np.ndarray, slots: int = 64,
                   rank: int | None = None, job: int | None = None) -> None:
        burst = make_burst(Kind.DATA, self.job_id if job is None else job,
                           self.rank if rank is None else rank, chunks % slots,
                           (chunks // slots) % 2, chunks, values)
        self.sock.send_multipart([FRAME_DATA, burst], copy=False)

    def stats(self) -> dict:
        self.send(StatsRequest())
        return self.control(StatsReply).stats

    def quiet(self, timeout: float = 0.3) -> bool:
        return not self.sock.poll(int(timeout * 1000))


@pytest.fixture
def switch(switch_thread):
    """Start a switch in a thread; tests pass config overrides via `switch(**kw)`; its endpoint."""
    return lambda **overrides: switch_thread(**overrides).endpoint


def join_all(ctx, endpoint: str, job: str, n: int, slots: int = 64) -> list[RawWorker]:
    workers = [RawWorker(ctx, endpoint) for _ in range(n)]
    for w in workers:
        w.join(job, n, slots)
    for w in workers:
        assert w.control(Ready).job_id == workers[0].job_id
    assert sorted(w.rank for w in workers) == list(range(n))
    return workers


def allreduce(workers: list[RawWorker], total_chunks: int, burst: int, rng, slots: int = 64,
              first: int = 0) -> None:
    """Every worker sends chunks first.. in bursts (self-clocked per burst); check exact sums."""
    data = rng.integers(-2**31, 2**31, size=(len(workers), total_chunks, K), dtype=np.int64)
    data = data.astype(np.int32)
    expected = data.sum(axis=0, dtype=np.int32)  # wraps like the switch
    for start in range(0, total_chunks, burst):
        index = np.arange(start, min(start + burst, total_chunks))
        chunks = first + index
        for i, w in enumerate(workers):
            w.send_burst(chunks, data[i, index], slots)
        for w in workers:
            got = w.results()
            assert got["kind"].tolist() == [Kind.RESULT] * len(chunks)
            order = np.argsort(got["chunk"])
            assert got["chunk"][order].tolist() == chunks.tolist()
            np.testing.assert_array_equal(got["values"][order], expected[index])


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("dataplane", ["fast", "golden"])
def test_server_join_ready_and_exact_allreduce(ctx, switch, dataplane):
    endpoint = switch(dataplane=dataplane)
    workers = join_all(ctx, endpoint, "sum", 3)
    allreduce(workers, total_chunks=200, burst=64, rng=np.random.default_rng(0))
    stats = workers[0].stats()["jobs"][str(workers[0].job_id)]
    assert stats["completions"] == 200 and stats["bursts_in"] == 3 * 4
    assert stats["packets_out"] == 3 * 200 and stats["wraps"] > 0
    assert workers[0].send(Heartbeat(workers[0].job_id, workers[0].rank)) is None
    assert workers[0].control(HeartbeatAck).job_id == workers[0].job_id


def test_server_four_workers_and_retransmission_answered(ctx, switch):
    endpoint = switch()
    workers = join_all(ctx, endpoint, "four", 4)
    allreduce(workers, total_chunks=128, burst=64, rng=np.random.default_rng(1))
    # A retransmission of a completed chunk gets the shadow copy, to the sender alone.
    w = workers[2]
    w.send_burst(np.arange(64, 66), np.zeros((2, K), np.int32))
    got = w.results()
    assert got["kind"].tolist() == [Kind.RESULT_RETX] * 2
    assert all(other.quiet(0.2) for other in workers if other is not w)


def test_server_malformed_frames_counted_and_answered_without_crash(ctx, switch):
    endpoint = switch()
    w = RawWorker(ctx, endpoint)
    w.join("solo", 1)
    assert w.control(Ready)
    rng = np.random.default_rng(2)
    one = np.arange(1)
    w.sock.send_multipart([FRAME_DATA, rng.bytes(3 * packet_bytes(K) + 5)])  # noise
    bad_magic = make_burst(Kind.DATA, w.job_id, 0, one, one * 0, one, np.ones((1, K), np.int32))
    bad_magic["magic"] = 0
    w.sock.send_multipart([FRAME_DATA, bad_magic])
    w.send_burst(one, np.ones((1, K), np.int32), rank=5)               # spoofed rank
    w.send_burst(one, np.ones((1, K), np.int32), job=w.job_id + 1)     # another job
    w.send_burst(np.array([100]), np.ones((1, K), np.int32), slots=128)  # slot beyond the job's 64
    assert w.quiet(0.3)                                                # bad data is not answered
    w.sock.send_multipart([FRAME_CONTROL, b"{" + b" " * 70_000 + b"}"])  # oversized control
    err = w.control(Error)
    assert (err.code, err.field) == ("malformed", "length")
    w.sock.send_multipart([FRAME_CONTROL, b"not json"])
    assert w.control(Error).field == "body"
    w.sock.send_multipart([b"X", b"?"])
    assert w.control(Error).field == "frames"
    # A stranger's data gets one ERROR, not one per burst.
    stranger = RawWorker(ctx, endpoint)
    for _ in range(3):
        stranger.send_burst(one, np.ones((1, K), np.int32), job=w.job_id, rank=0)
    assert stranger.control(Error).code == "not_joined"
    assert stranger.quiet(0.3)
    # The switch still serves the job, and counted every reason.
    w.send_burst(one, np.full((1, K), 7, np.int32))
    assert w.results()["values"].tolist() == [[7] * K]
    stats = w.stats()
    job = stats["jobs"][str(w.job_id)]
    assert job["malformed"]["bad_magic"] >= 1 and job["malformed"]["truncated"] == 1
    for reason in ("bad_worker", "bad_job", "bad_slot"):
        assert job["malformed"][reason] == 1, job["malformed"]
    assert stats["unknown_sender"] == 3
    assert stats["malformed"] == {"control:length": 1, "control:body": 1, "frame_type": 1}


def test_server_silent_worker_aborts_the_others(ctx, switch):
    endpoint = switch(liveness_timeout=0.5, heartbeat_interval=0.1)
    alive, silent = join_all(ctx, endpoint, "live", 2)
    start, limit = time.monotonic(), 0.5 + 1.0   # liveness_timeout + 1 s
    abort = None
    while abort is None and time.monotonic() - start < limit:
        alive.send(Heartbeat(alive.job_id, alive.rank))
        message = alive.control(timeout=0.5)
        if isinstance(message, Abort):
            abort = message
        else:
            assert isinstance(message, HeartbeatAck)
            time.sleep(0.1)
    assert abort is not None, f"no ABORT within {limit} s"
    assert abort.rank == silent.rank and f"rank {silent.rank}" in abort.reason
    assert "silent" in abort.reason
    # Its connections are told to re-join, and the slots are back in the pool.
    while not alive.quiet(0.2):   # answers to heartbeats sent around the abort
        alive.recv()
    alive.send(Heartbeat(alive.job_id, alive.rank))
    later = alive.control(Abort)
    assert later.rank == silent.rank and "re-join" in later.reason
    assert alive.stats()["jobs_aborted"] == 1


def test_server_two_jobs_at_once(ctx, switch):
    endpoint = switch(slots=256)
    a = join_all(ctx, endpoint, "a", 2, slots=64)
    b = join_all(ctx, endpoint, "b", 3, slots=128)
    rng = np.random.default_rng(3)
    for call in range(2):  # chunk numbers keep running across calls, as the client's do
        allreduce(a, 64, 64, rng, slots=64, first=64 * call)
        allreduce(b, 128, 128, rng, slots=128, first=128 * call)
    stats = a[0].stats()
    ja = stats["jobs"][str(a[0].job_id)]  # a member sees its own job only
    jb = b[0].stats()["jobs"][str(b[0].job_id)]
    assert a[0].job_id != b[0].job_id
    assert ja["completions"] == 128 and jb["completions"] == 256
    ranges = sorted([(ja["slot_base"], ja["slot_base"] + 64), (jb["slot_base"], jb["slot_base"] + 128)])
    assert ranges[0][1] <= ranges[1][0] and stats["slots_free"] == 64
    # A third job that does not fit is refused with a reason.
    c = RawWorker(ctx, endpoint)
    c.send(Join("c", 1, K, 128, ""))
    err = c.control(Error)
    assert err.code == "pool_exhausted" and err.field == "slots"


def test_server_leave_graceful_and_with_reason(ctx, switch):
    endpoint = switch()
    w0, w1, w2 = join_all(ctx, endpoint, "leave", 3)
    w0.send(Leave(w0.job_id, w0.rank))
    w0.stats()  # answered after the LEAVE on the same connection: w0 has left before w1 leaves
    w1.send(Leave(w1.job_id, w1.rank, "out of memory"))
    for w in (w2,):
        abort = w.control(Abort)
        assert abort.rank == w1.rank and "out of memory" in abort.reason
    assert w0.quiet(0.2) and w1.quiet(0.2)


def test_server_loss_injection_duplicates_reach_the_dataplane(ctx, switch):
    endpoint = switch(duplicate=1.0, seed=4)
    w = RawWorker(ctx, endpoint)
    w.join("dup", 1)
    w.control(Ready)
    w.send_burst(np.arange(4), np.ones((4, K), np.int32))
    got = [w.results()]  # a lossy job's results for one worker may share a message (_coalesce)
    while sum(len(g) for g in got) < 16:
        got.append(w.results())
    kinds = sorted(int(x) for g in got for x in g["kind"])
    # Ingress: each packet arrives twice (completes, then answered from the shadow copy); egress:
    # every result is duplicated too.
    assert kinds == [Kind.RESULT] * 8 + [Kind.RESULT_RETX] * 8
    job = w.stats()["jobs"][str(w.job_id)]
    assert job["retransmissions_answered"] == 4 and job["injected_duplicates"] == 4 + 8


@pytest.mark.parametrize("dataplane", ["fast", "golden"])
def test_server_lossy_job_answers_each_worker_in_the_layout_it_sends(ctx, switch, dataplane):
    # The emulated links handle split bursts alone; a peer that speaks interleaved bursts still
    # gets interleaved results back, a split one split results, and the sums stay exact (the
    # golden dataplane takes interleaved bursts alone: the switch joins and splits around it).
    endpoint = switch(duplicate=1.0, reorder=0.5, seed=3, dataplane=dataplane)
    joined, split = join_all(ctx, endpoint, "layouts", 2)
    chunks = np.arange(16)
    values = np.arange(16 * K, dtype=np.int32).reshape(16, K)
    joined.send_burst(chunks, values)
    burst = make_burst(Kind.DATA, split.job_id, split.rank, chunks % 64, (chunks // 64) % 2,
                       chunks, 2 * values)
    heads, vals = split_burst(burst)
    split.sock.send_multipart([FRAME_DATA, heads, vals], copy=False)
    for w, parts in ((joined, 2), (split, 3)):
        got: dict[int, np.ndarray] = {}
        deadline = time.monotonic() + 5
        while len(got) < 16 and time.monotonic() < deadline:
            if not w.sock.poll(200):
                continue
            frames = w.sock.recv_multipart()
            assert len(frames) == parts and frames[0] == FRAME_DATA, frames[:1]
            packets = (parse_burst(frames[1], K)[0] if parts == 2 else
                       join_split(*parse_split(frames[1], frames[2], K)[:2], K))
            for p in packets:
                got[int(p["chunk"])] = p["values"]
        assert sorted(got) == list(range(16))
        np.testing.assert_array_equal(np.stack([got[c] for c in range(16)]), 3 * values)


def test_server_reordered_packets_released_once_the_queue_is_handled(ctx, switch):
    endpoint = switch(reorder=1.0)    # every packet held back, both directions
    w = RawWorker(ctx, endpoint)
    w.join("late", 1)
    w.control(Ready)
    w.send_burst(np.arange(5), np.arange(5 * K, dtype=np.int32).reshape(5, K))
    got = w.results(timeout=2.0)      # held at ingress, then at egress, released after each
    assert sorted(got["chunk"].tolist()) == list(range(5))
    assert got["values"][np.argsort(got["chunk"])].ravel().tolist() == list(range(5 * K))
    assert w.stats()["jobs"][str(w.job_id)]["injected_reorders"] == 10


def test_server_reordered_packets_released_while_other_traffic_keeps_it_busy(ctx, switch):
    # A held packet arrives after the rest of its burst, not once the switch has been idle for a
    # poll interval: a stranger's message every 10 ms (no quiet 100 ms) used to hold a call's
    # last packets until that flow's next burst (issue 15: the slowest calls at 10% reorder).
    endpoint = switch(reorder=1.0)
    w, busy = RawWorker(ctx, endpoint), RawWorker(ctx, endpoint)
    w.join("late", 1)
    w.control(Ready)
    w.send_burst(np.arange(3), np.ones((3, K), np.int32))
    deadline = time.monotonic() + 2.0
    while not w.sock.poll(10):
        assert time.monotonic() < deadline, "held packets never released while the switch was busy"
        busy.send(StatsRequest())
    got = w.results()
    assert sorted(got["chunk"].tolist()) == [0, 1, 2]
    assert (got["values"] == 1).all()


def test_server_sigterm_aborts_workers_and_exits_zero(ctx, spawn):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn([PYTHON, "-m", "switch_emulator", "--bind", endpoint, "--stats-interval", "0",
                  "--log-level", "WARNING"])
    w = RawWorker(ctx, endpoint)
    w.send(Join("sig", 2, K, 64, ""))          # DEALER queues it until the switch has bound
    ok = w.control(JoinOk, timeout=15)
    os.kill(proc.pid, signal.SIGTERM)
    abort = w.control(Abort, timeout=5)
    assert abort.job_id == ok.job_id and abort.reason == "switch shutting down"
    assert proc.wait(timeout=10) == 0


def test_cli_rejects_bad_option_and_busy_endpoint(ctx, switch, spawn):
    proc = spawn([PYTHON, "-m", "switch_emulator", "--heartbeat-interval", "5"])
    assert proc.wait(timeout=20) == 2
    endpoint = switch()
    proc = spawn([PYTHON, "-m", "switch_emulator", "--bind", endpoint])
    assert proc.wait(timeout=20) == 2


def test_stats_reply_is_plain_json(ctx, switch):
    endpoint = switch()
    w = RawWorker(ctx, endpoint)
    stats = w.stats()
    assert json.loads(json.dumps(stats)) == stats and stats["jobs"] == {}
