"""`switch-emulator --pipes P` against hostile or careless peers, as tests/test_hardening.py does for
the main socket: malformed frames and packets to a pipe, a worker killed mid-call, a worker that
never reads its results (byte budget, then abort), and token plus CURVE on the pipes.

Invariants: a pipe never raises on a peer's bytes (each bad message is dropped and counted by
reason); what a pipe queues for one worker stays within --peer-queue-bytes, and a worker over it
for the liveness timeout gets its job aborted with that reason while other jobs go on; a dead
worker's job is aborted for everyone with a clear error. The pipe's loop is driven in-process
(`_Pipe` with real sockets) where counters are the point, and as processes where a crash or
memory is. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq

from conftest import PYTHON, REPO, free_port, rss_bytes
from switch_emulator._config import SwitchConfig
from switch_emulator._pipes import MAX_WAITING, _Pipe
from switch_emulator.server import SwitchServer
from switchagg import ClientConfig, JobAborted, SwitchClient, SwitchError
from switchagg.packet import Kind, make_burst, split_burst
from switchagg.protocol import (FRAME_CONTROL, FRAME_DATA, Error, Heartbeat, Join, JoinOk,
                                PipeHello, PipeHelloOk, Ready, decode_control, encode_control)

pytestmark = pytest.mark.timeout(90)

K, SLOTS = 8, 16
CONFIG = ClientConfig(k=8, slots=64, burst=8, join_timeout=30, op_timeout=15, rto_min=0.01)


# ------------------------------------------------------------------ a pipe's loop, in-process


class PipeRig:
    """One `_Pipe` (pipe 0 of 2: slots [0, 8) of 16) on inproc sockets, with a DEALER peer."""

    def __init__(self, budget: int = 1 << 20, liveness: float = 3.0) -> None:
        self.ctx = zmq.Context()
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind("inproc://pipe")
        control = self.ctx.socket(zmq.PAIR)
        control.bind("inproc://control")
        self.main = self.ctx.socket(zmq.PAIR)   # the main process's end of the channel
        self.main.connect("inproc://control")
        self.pipe = _Pipe(0, 2, router, control, budget, liveness)
        self.pipe.on_control({"op": "member", "job_id": 3, "rank": 0, "world_size": 1, "k": K,
                              "slots": SLOTS, "key": "k0"})

    def peer(self, identity: bytes, rcvhwm: int = 1000) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("inproc://pipe")
        return sock

    def deliver(self, sock: zmq.Socket, *frames) -> None:
        """Send `frames` from `sock` and run the pipe on the message."""
        sock.send_multipart(list(frames), copy=False)
        assert self.pipe.sock.poll(2000)
        self.pipe.on_message(self.pipe.sock.recv_multipart(copy=False))

    def greet(self, sock: zmq.Socket, key: str = "k0", rank: int = 0):
        self.deliver(sock, FRAME_CONTROL, encode_control(PipeHello(3, rank, key)))
        return reply(sock)

    @property
    def counters(self) -> dict:
        return self.pipe.jobs[3].counters

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def reply(sock: zmq.Socket):
    assert sock.poll(2000), "no answer"
    frames = sock.recv_multipart()
    assert frames[0] == FRAME_CONTROL
    return decode_control(frames[1])


def burst(first_chunk: int, n: int = 8, job: int = 3, worker: int = 0, slot0: int = 0):
    chunks = np.arange(first_chunk, first_chunk + n)
    return make_burst(Kind.DATA, job, worker, (chunks - first_chunk + slot0) % SLOTS,
                      (chunks // SLOTS) % 2, chunks, np.ones((n, K), np.int32))


@pytest.fixture
def rig():
    made = []

    def make(**kw):
        made.append(PipeRig(**kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


def test_pipe_answers_bad_greetings_and_drops_what_ungreeted_peers_send(rig):
    r = rig()
    stranger = r.peer(b"stranger")
    r.deliver(stranger, FRAME_CONTROL, b"{not json")
    assert isinstance(reply(stranger), Error)
    r.deliver(stranger, FRAME_CONTROL, b'{"type":"PIPE_HELLO","job_id":' + b"[" * 5000 + b"}")
    assert reply(stranger).code == "malformed"
    err = r.greet(stranger, key="wrong")
    assert isinstance(err, Error) and err.code == "rejected" and err.field == "key"
    r.deliver(stranger, FRAME_DATA, *split_burst(burst(0)))   # not greeted: dropped
    assert r.counters.get("packets_in", 0) == 0 and not stranger.poll(100)


def test_pipe_counts_every_malformed_message_and_still_sums(rig):
    r = rig()
    w = r.peer(b"w0")
    assert isinstance(r.greet(w), PipeHelloOk)
    heads, vals = split_burst(burst(0))
    r.deliver(w, FRAME_DATA, burst(0).tobytes())                      # interleaved: 2 frames
    r.deliver(w, FRAME_DATA, heads, vals, b"extra")                   # 4 frames
    r.deliver(w, FRAME_DATA, heads.tobytes()[:-3], vals)              # truncated header words
    r.deliver(w, FRAME_DATA, heads, vals.tobytes()[:-4])              # truncated payloads
    r.deliver(w, FRAME_DATA, np.zeros((SLOTS + 1, 4), np.int32),
              np.zeros((SLOTS + 1, K), np.int32))                     # more than the job's slots
    r.deliver(w, FRAME_DATA, *split_burst(burst(0, job=4)))           # another job
    r.deliver(w, FRAME_DATA, *split_burst(burst(0, worker=1)))        # another rank
    r.deliver(w, FRAME_DATA, *split_burst(burst(8, slot0=8)))         # pipe 1's slots
    garbage = np.random.default_rng(0).integers(-2**31, 2**31, (8, 4)).astype(np.int32)
    r.deliver(w, FRAME_DATA, garbage, vals)                           # random header words
    c = r.counters
    assert c["malformed_frames"] == 2 and c["truncated"] == 2 and c["oversized"] == 1
    assert c["bad_job"] == 8 and c["bad_worker"] == 8 and c["bad_slot"] >= 8, c
    # the random words: out of this pipe's range, or of no valid magic; all 8 dropped
    assert sum(n for name, n in c.items() if name.startswith("bad_")) == 4 * 8, c
    assert not w.poll(100)   # nothing of that was summed
    r.deliver(w, FRAME_DATA, *split_burst(burst(0)))                  # a good one
    assert w.poll(2000)
    kind, _, v = w.recv_multipart()
    assert kind == FRAME_DATA
    np.testing.assert_array_equal(np.frombuffer(v, "<i4"), np.ones(8 * K, np.int32))


def test_pipe_forgets_the_oldest_greetings_of_unknown_members(rig):
    r = rig()
    rogue = r.peer(b"rogue")
    for i in range(MAX_WAITING + 50):   # one identity here; ROUTER identities are what it keys
        r.pipe.greet(f"id-{i}".encode(), PipeHello(9, 0, "x"))
    assert len(r.pipe.waiting) == MAX_WAITING
    assert b"id-0" not in r.pipe.waiting and f"id-{MAX_WAITING + 49}".encode() in r.pipe.waiting
    rogue.close()


def test_pipe_bounds_what_it_queues_for_a_peer_that_does_not_read_then_reports_it(rig):
    """World of 1: each burst completes at once and its results go to the member, which never
    reads. Past the budget results are refused; past the liveness timeout over it, the pipe
    reports `not_reading` to the main process once and drops the job's data."""
    budget = 1 << 16
    r = rig(budget=budget, liveness=0.05)
    w = r.peer(b"w0", rcvhwm=100_000)
    assert isinstance(r.greet(w), PipeHelloOk)
    per_burst = 8 * (16 + 4 * K)
    for i in range(2 * budget // per_burst):
        r.deliver(w, FRAME_DATA, *split_burst(burst(i * SLOTS)))
    assert r.pipe.queues.queued(b"w0") <= budget
    assert r.counters["results_refused"] > 0
    time.sleep(0.1)   # over budget for longer than the liveness timeout
    r.deliver(w, FRAME_DATA, *split_burst(burst(10_000 * SLOTS)))
    r.deliver(w, FRAME_DATA, *split_burst(burst(10_001 * SLOTS)))
    assert r.main.poll(2000)
    report = json.loads(r.main.recv())
    assert report["op"] == "not_reading" and report["job_id"] == 3 and report["rank"] == 0
    assert report["queued"] <= budget == report["budget"]
    assert not r.main.poll(100)   # once
    r.pipe.on_control({"op": "drop", "job_id": 3})
    assert r.pipe.queues.queued(b"w0") == 0


# --------------------------------------------------------------- a switch with pipes, processes


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def wait_for_switch(address: str, timeout: float = 60.0) -> None:
    from switch_emulator.probe import probe
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe(address, timeout=0.5)
            return
        except SwitchError:
            assert time.monotonic() < deadline, "switch did not start"


def pair(address: str, job: str, n: int = 2, **kw) -> list[SwitchClient]:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda r: SwitchClient(address, job, n, r, config=CONFIG, **kw),
                             range(n)))


def allreduce_all(clients, arrays):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(lambda ca: ca[0].allreduce(ca[1]), zip(clients, arrays)))


@pytest.mark.slow
def test_pipes_switch_survives_garbage_on_every_pipe_socket(spawn):
    """Random frames (any count, any bytes) and random DATA packets, greeted or not, to every
    pipe: every pipe process is still alive and a job still gets exact sums."""
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "ERROR",
                  "--pipes", "2", "--stats-interval", "0"])
    wait_for_switch(address)
    ctx = zmq.Context()
    try:
        main = ctx.socket(zmq.DEALER)
        main.setsockopt(zmq.LINGER, 0)
        main.connect(address)
        main.send_multipart([FRAME_CONTROL, encode_control(Join("rogue", 1, K, SLOTS))])
        ok = reply(main)
        assert isinstance(ok, JoinOk) and isinstance(reply(main), Ready) and len(ok.pipes) == 2
        rng = np.random.default_rng(1)
        for endpoint in ok.pipes:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            for i in range(300):
                if i == 150:   # greet halfway: the rest goes through the data path
                    sock.send_multipart([FRAME_CONTROL, encode_control(
                        PipeHello(ok.job_id, ok.rank, ok.pipe_key))])
                parts = int(rng.integers(1, 6))
                frames = [rng.bytes(int(rng.integers(0, 600))) for _ in range(parts)]
                if rng.random() < 0.5:
                    frames[0] = rng.choice([FRAME_DATA, FRAME_CONTROL])
                if rng.random() < 0.3:   # well-formed words, random fields
                    heads = rng.integers(-2**31, 2**31, (8, 4)).astype(np.int32)
                    heads[:, 0] = 0x5A | (1 << 8) | (int(Kind.DATA) << 16)
                    frames = [FRAME_DATA, heads.tobytes(), np.ones((8, K), np.int32).tobytes()]
                sock.send_multipart(frames)
            sock.close()
        main.close()
        honest = pair(address, "honest")
        x = np.arange(5000, dtype=np.int32)
        for got in allreduce_all(honest, [x, x]):
            np.testing.assert_array_equal(got, 2 * x)
        for c in honest:
            c.close()
        assert proc.poll() is None and len(children(proc.pid)) >= 2
    finally:
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_pipes_a_worker_killed_mid_call_aborts_its_job_and_the_switch_goes_on(spawn):
    address = f"tcp://127.0.0.1:{free_port()}"
    spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "ERROR",
           "--pipes", "2", "--liveness-timeout", "1", "--heartbeat-interval", "0.2",
           "--stats-interval", "0"])
    wait_for_switch(address)
    victim = spawn([PYTHON, os.path.join(REPO, "tests", "switch_worker.py"), address, "kill", "3",
                    "2", "loop"], stdout=subprocess.PIPE, text=True)
    errors: list = [None, None]

    def survivor(rank: int) -> None:
        from switch_worker import CONFIG as WORKER_CONFIG, make_input
        try:
            with SwitchClient(address, "kill", 3, rank, config=WORKER_CONFIG) as c:
                call = 0
                while True:
                    c.allreduce(make_input(0, rank, call, 64 * 64 * 8))
                    call += 1
        except SwitchError as exc:
            errors[rank] = (exc, time.monotonic())

    threads = [threading.Thread(target=survivor, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    time.sleep(2.0)   # all three are streaming through the pipes
    assert victim.poll() is None
    os.killpg(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a survivor hung"
    for exc, when in errors:
        assert isinstance(exc, JobAborted), exc
        assert "rank 2" in str(exc), exc
        print(f"survivor told after {when - killed:.2f} s: {exc}")
    honest = pair(address, "after")   # the switch goes on
    x = np.arange(100, dtype=np.int32)
    for got in allreduce_all(honest, [x, x]):
        np.testing.assert_array_equal(got, 2 * x)
    for c in honest:
        c.close()


@pytest.mark.slow
def test_pipes_memory_stays_bounded_with_a_peer_that_never_reads(spawn):
    """As the main socket's test: a peer greets pipe 0 and streams 200 bursts of 1.1 MB to it
    but never reads. The pipes' RSS grows by at most the byte budget plus slack, the peer's
    job is aborted for not reading, and another job is served through the pipes meanwhile."""
    address = f"tcp://127.0.0.1:{free_port()}"
    budget = int(os.environ.get("SWITCHAGG_TEST_BUDGET", str(8 << 20)))  # huge: see the leak
    proc = spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
                  "--pipes", "2", "--liveness-timeout", "2", "--heartbeat-interval", "0.2",
                  "--peer-queue-bytes", str(budget), "--stats-interval", "0"])
    wait_for_switch(address)
    honest = pair(address, "honest")
    allreduce_all(honest, [np.ones(64, np.int32)] * 2)
    pipes = children(proc.pid)

    def rss() -> int:
        return rss_bytes(proc.pid) + sum(rss_bytes(p) for p in pipes)
    before = rss()
    ctx = zmq.Context()
    try:
        main = ctx.socket(zmq.DEALER)
        main.setsockopt(zmq.LINGER, 0)
        main.connect(address)
        k, slots, n = 64, 8192, 4096
        main.send_multipart([FRAME_CONTROL, encode_control(Join("rogue", 1, k, slots))])
        ok = reply(main)
        assert isinstance(ok, JoinOk) and isinstance(reply(main), Ready)
        rogue = ctx.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 1), (zmq.RCVBUF, 4096),
                              (zmq.SNDTIMEO, 5000)):
            rogue.setsockopt(option, value)
        rogue.connect(ok.pipes[0])   # pipe 0: slots [0, 4096)
        rogue.send_multipart([FRAME_CONTROL, encode_control(
            PipeHello(ok.job_id, ok.rank, ok.pipe_key))])
        assert isinstance(reply(rogue), PipeHelloOk)
        values = np.ones((n, k), np.int32)

        def send(i: int) -> int:
            chunks = np.arange(i * n, (i + 1) * n)
            b = make_burst(Kind.DATA, ok.job_id, 0, chunks % n, (chunks // n) % 2, chunks,
                           values)
            rogue.send_multipart([FRAME_DATA, *split_burst(b)], copy=False)
            return b.nbytes
        size = 0
        for i in range(200):
            size = send(i)
            if i % 20 == 0:
                main.send_multipart([FRAME_CONTROL, encode_control(Heartbeat(ok.job_id, 0))])
                allreduce_all(honest, [np.full(64, i, np.int32)] * 2)
        for _ in range(15):   # past the liveness timeout over budget (alive: it heartbeats)
            main.send_multipart([FRAME_CONTROL, encode_control(Heartbeat(ok.job_id, 0))])
            time.sleep(0.2)
        for i in range(200, 205):
            send(i)
        # The abort comes on the main socket, naming the reason.
        deadline = time.monotonic() + 10
        abort = None
        while abort is None and time.monotonic() < deadline:
            if main.poll(200):
                _, body = main.recv_multipart()
                message = decode_control(body)
                if type(message).__name__ == "Abort":
                    abort = message
            else:
                main.send_multipart([FRAME_CONTROL, encode_control(Heartbeat(ok.job_id, 0))])
        during = rss()
        rogue.close()
        main.close()
    finally:
        ctx.destroy(linger=0)
    print(f"switch + pipes RSS before {before / 2**20:.0f} MiB, with the non-reader "
          f"{during / 2**20:.0f} MiB (budget {budget / 2**20:.0f} MiB; 200 bursts = "
          f"{200 * size / 2**20:.0f} MiB)")
    assert abort is not None and "not read its results" in abort.reason, abort
    assert during - before < 96 << 20, (before, during)
    x = np.ones(64, np.int32)
    for got in allreduce_all(honest, [x, x]):   # still served
        np.testing.assert_array_equal(got, 2 * x)
    for c in honest:
        c.close()


def test_pipes_with_a_token_and_curve_give_exact_sums_and_refuse_keyless_peers(tmp_path):
    from switch_emulator._keys import keygen
    public, secret = keygen(str(tmp_path))
    config = SwitchConfig(bind=f"tcp://127.0.0.1:{free_port()}", stats_interval=0, linger=0.0,
                          pipes=2, log_level="WARNING", token="s3cret",
                          curve_secret_file=secret)
    server = SwitchServer(config)
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    try:
        clients = pair(server.endpoint, "secure", token="s3cret", server_key=public)
        rng = np.random.default_rng(5)
        xs = [rng.integers(-2**31, 2**31, 3000, dtype=np.int64).astype(np.int32)
              for _ in range(2)]
        for got in allreduce_all(clients, xs):
            np.testing.assert_array_equal(got, xs[0] + xs[1])
        for c in clients:
            c.close()
        # A plain socket gets no answer from a pipe: CURVE drops it before the pipe's loop.
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.pipes.endpoints[0])
            sock.send_multipart([FRAME_CONTROL, b"{not json"])
            assert not sock.poll(500)
        finally:
            ctx.destroy(linger=0)
        with pytest.raises(SwitchError, match="token"):
            SwitchClient(server.endpoint, "secure2", 1, config=CONFIG, server_key=public)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_frame_larger_than_any_burst_never_reaches_the_switch_or_a_pipe():
    """libzmq drops a peer whose frame exceeds MAX_BURST_BYTES (ZMQ_MAXMSGSIZE) before buffering
    it: no ERROR comes back (the control plane never saw the frame, which it would answer), and
    the switch serves the next job."""
    from switchagg.packet import MAX_BURST_BYTES
    config = SwitchConfig(bind=f"tcp://127.0.0.1:{free_port()}", stats_interval=0, linger=0.0,
                          pipes=2, log_level="WARNING")
    server = SwitchServer(config)
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    ctx = zmq.Context()
    try:
        for endpoint in (server.endpoint, *server.pipes.endpoints):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send_multipart([FRAME_CONTROL, b"{" + b" " * MAX_BURST_BYTES + b"}"])
            assert not sock.poll(500), endpoint
            sock.close()
        sock = ctx.socket(zmq.DEALER)   # the same bytes under the cap are answered (main socket)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send_multipart([FRAME_CONTROL, b"{" + b" " * (MAX_BURST_BYTES - 2) + b"}"])
        assert reply(sock).code == "malformed"
        with SwitchClient(server.endpoint, "after", 1, config=CONFIG) as client:
            x = np.arange(300, dtype=np.int32)
            np.testing.assert_array_equal(client.allreduce(x), x)
    finally:
        ctx.destroy(linger=0)
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
