"""The switch and the client against hostile or careless peers: each attack of issue 15 is a test.

Invariants: no control frame raises out of the switch's loop (each bad one is answered with ERROR
naming the field, and counted); no peer touches another's job (quotas, tokens, STATS visibility,
full jobs); calls that drift apart fail at once, naming both call numbers; a restarted switch is
noticed within a few seconds; the client never hangs on bad input. Switches run in a thread
(`switch` fixture) or, where a crash is the point, as a child process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PYTHON, free_port, rss_bytes
from switch_emulator._admission import Policy
from switch_emulator._callseq import CallCheck
from switch_emulator._config import SwitchConfig
from switch_emulator._golden import GoldenDataplane
from switch_emulator._jobs import ControlPlane, ErrorCode
from switch_emulator.probe import probe
from switchagg import ClientConfig, JobAborted, JoinRejected, SwitchClient, SwitchError
from switchagg._limits import MAX_DEPTH, MAX_INT_DIGITS, check_endpoint, json_depth
from switchagg.errors import ProtocolError
from switchagg.packet import Kind, make_burst, split_burst
from switchagg.protocol import (FRAME_CONTROL, Error, Join, JoinOk, Ready, StatsReply,
                                StatsRequest, decode_control, encode_control)

pytestmark = pytest.mark.timeout(60)

K = 8
FAST = ClientConfig(k=8, slots=16, burst=4, join_timeout=5, op_timeout=5, rto_min=0.01)

#: The frames of issue 15 that each ended the switch with a traceback.
ATTACK_FRAMES = {
    "deep_nesting": (b'{"type":"JOIN","job":' + b"[" * 5000 + b"]" * 5000 + b"}", "depth"),
    "huge_integer": (b'{"type":"JOIN","job":"j","world_size":' + b"9" * 5000
                     + b',"k":8,"slots":16}', "integer"),
    "non_ascii_token": (json.dumps({"type": "JOIN", "job": "j", "world_size": 2, "k": 8,
                                    "slots": 16, "token": "t\u00f6ken"}).encode(), "token"),
    "non_ascii_job": (json.dumps({"type": "JOIN", "job": "\u2603", "world_size": 2, "k": 8,
                                  "slots": 16}).encode(), "job"),
    "deep_stats": (b'{"type":"STATS","job_id":' + b"[" * 100 + b"]" * 100 + b"}", "depth"),
    "long_reason": (json.dumps({"type": "LEAVE", "job_id": 0, "rank": 0,
                                "reason": "x" * 5000}).encode(), "reason"),
    "error_value_object": (json.dumps({"type": "ERROR", "code": "c", "message": "m",
                                       "value": {"a": [1]}}).encode(), "value"),
}


def plane(**policy) -> ControlPlane:
    return ControlPlane(1024, 0.5, 3.0, GoldenDataplane, policy=Policy(**policy))


def only(replies, cls):
    assert len(replies) == 1, replies
    assert isinstance(replies[0][1], cls), replies
    return replies[0][1]


def error(replies, code: str, field: str | None = None) -> Error:
    err = only(replies, Error)
    assert err.code == code, err
    if field is not None:
        assert err.field == field, err
    return err


@pytest.fixture
def switch(switch_thread):
    """Start switches in threads: `switch(**config)` returns the endpoint and the server."""

    def start(**overrides):
        server = switch_thread(**{"liveness_timeout": 1.0, "heartbeat_interval": 0.2,
                                  **overrides})
        return server.endpoint, server

    return start


def raw(ctx, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def control(sock: zmq.Socket, timeout: float = 3.0):
    assert sock.poll(int(timeout * 1000)), f"no answer within {timeout} s"
    kind, body = sock.recv_multipart()
    assert kind == FRAME_CONTROL
    return decode_control(body, 1 << 22)


def pair(endpoint: str, job: str, n: int = 2, **kw) -> list[SwitchClient]:
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(SwitchClient, endpoint, job, n, r, config=FAST, **kw)
                   for r in range(n)]
        return [f.result() for f in futures]


def allreduce_all(clients, arrays, **kw):
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(c.allreduce, a, **kw) for c, a in zip(clients, arrays)]
        return [f.result(timeout=30) for f in futures]


# ----------------------------------------------------------------------------------- 1. parsing


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a":"[[[[{{{{","b":[1,[2]]}') == 3
    assert json_depth(b'"\\"[[["') == 0 and json_depth(b"") == 0


@pytest.mark.parametrize("name", sorted(ATTACK_FRAMES))
def test_attack_frame_is_answered_with_error_naming_the_field(name):
    frame, field = ATTACK_FRAMES[name]
    cp = plane()
    err = error(cp.on_control(b"rogue", frame, 0.0), ErrorCode.MALFORMED, field)
    assert cp.counters["malformed"] == {f"control:{field}": 1}
    assert len(encode_control(err)) < 4096  # the answer itself stays small


def test_limits_at_their_edges():
    deep = b'{"type":"STATS","x":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    with pytest.raises(ProtocolError) as info:
        decode_control(deep)
    assert info.value.field == "x"  # parsed (depth MAX_DEPTH), refused as an unknown field
    with pytest.raises(ProtocolError) as info:
        decode_control(deep.replace(b"[", b"[[", 1).replace(b"]", b"]]", 1))
    assert info.value.field == "depth"
    longest = b'{"type":"STATS","job_id":-' + b"9" * MAX_INT_DIGITS + b"}"
    with pytest.raises(ProtocolError) as info:
        decode_control(longest)
    assert info.value.field == "job_id"  # parsed, then out of range
    with pytest.raises(ProtocolError) as info:
        decode_control(longest.replace(b"-", b"-9"))
    assert info.value.field == "integer"


def test_token_comparison_never_meets_non_ascii():
    cp = plane()
    only(cp.on_message(b"a", Join("j", 2, K, 16, "secret"), 0.0), JoinOk)
    frame, _ = ATTACK_FRAMES["non_ascii_token"]
    error(cp.on_control(b"b", frame, 0.0), ErrorCode.MALFORMED, "token")
    error(cp.on_message(b"c", Join("j", 2, K, 16, "other"), 0.0), ErrorCode.BAD_TOKEN)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12),
                                                                       children, max_size=5),
    max_leaves=30)
_fields = st.sampled_from(["type", "job", "world_size", "k", "slots", "token", "rank", "job_id",
                           "reason", "summary", "versions", "incarnation", "value"])
_types = st.sampled_from(["JOIN", "LEAVE", "HEARTBEAT", "STATS", "QUERY", "ERROR", "ABORT",
                          "JOIN_OK", "READY", "X"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, body: json.dumps({"type": t, **body}).encode(), _types,
              st.dictionaries(_fields, _json, max_size=7)),
    _json.map(lambda v: json.dumps(v).encode())))
def test_fuzz_control_frames_never_raise(frame):
    """Invariant: any control frame yields replies the switch can encode, or none; never raises."""
    cp = plane()
    only(cp.on_message(b"member", Join("j", 2, K, 16), 0.0), JoinOk)
    for who in (b"member", b"stranger"):
        for _, message in cp.on_control(who, frame, 1.0):
            encode_control(message)
    # The control plane still works after whatever the frame was.
    assert isinstance(cp.on_message(b"late", Join("j", 2, K, 16), 2.0)[0][1], (JoinOk, Error))


def test_switch_survives_every_attack_frame_and_keeps_serving(ctx, switch):
    endpoint, server = switch()
    clients = pair(endpoint, "honest")
    rogue = raw(ctx, endpoint)
    for name, (frame, field) in sorted(ATTACK_FRAMES.items()):
        rogue.send_multipart([FRAME_CONTROL, frame])
        err = control(rogue)
        assert isinstance(err, Error) and err.field == field, (name, err)
    rogue.send_multipart([FRAME_CONTROL, b"{}", b"x"] + [b""] * 50)  # too many parts
    assert isinstance(control(rogue), Error)
    data = [np.arange(40, dtype=np.int32), np.ones(40, np.int32)]
    for got in allreduce_all(clients, data):
        np.testing.assert_array_equal(got, data[0] + data[1])
    assert probe(endpoint)["malformed"]["control:depth"] == 2
    for c in clients:
        c.close()


# ------------------------------------------------------------------------- 2. admission, isolation


def test_quota_slots_per_job():
    cp = plane(max_job_slots=64)
    err = error(cp.on_message(b"a", Join("j", 2, K, 65), 0.0, "10.0.0.1"), ErrorCode.QUOTA,
                "slots")
    assert "--max-job-slots" in err.message
    only(cp.on_message(b"a", Join("j", 2, K, 64), 0.0, "10.0.0.1"), JoinOk)


def test_quota_slots_and_jobs_per_host_are_refunded_when_a_job_ends():
    cp = plane(max_peer_slots=100, max_peer_jobs=2)
    only(cp.on_message(b"a", Join("a", 2, K, 60), 0.0, "h1"), JoinOk)
    error(cp.on_message(b"b", Join("b", 2, K, 60), 0.0, "h1"), ErrorCode.QUOTA, "slots")
    only(cp.on_message(b"b", Join("b", 2, K, 40), 0.0, "h1"), JoinOk)
    error(cp.on_message(b"c", Join("c", 2, K, 1), 0.0, "h1"), ErrorCode.QUOTA, "job")
    only(cp.on_message(b"c", Join("c", 2, K, 60), 0.0, "h2"), JoinOk)  # another host
    job = cp.by_name["a"]
    cp.abort(job, "test", None)
    only(cp.on_message(b"d", Join("d", 2, K, 60), 0.0, "h1"), JoinOk)


def test_join_timeout_frees_a_squatted_name_and_its_slots():
    cp = plane(join_timeout=10.0)
    only(cp.on_message(b"squatter", Join("real", 64, K, 512), 0.0), JoinOk)
    for t in range(1, 11):  # it stays alive (a repeated JOIN refreshes it as a heartbeat does)
        cp.on_message(b"squatter", Join("real", 64, K, 512), float(t))
        assert cp.check_liveness(float(t)) == []
    replies = cp.check_liveness(10.5)
    assert cp.counters["jobs_expired"] == 1 and "join timeout" in replies[0][1].reason
    assert cp.pool.free == 1024
    only(cp.on_message(b"w0", Join("real", 2, K, 16), 11.0), JoinOk)  # the real job can start


def test_switch_token_gates_joins_and_operator_stats():
    cp = plane(token="op")
    error(cp.on_message(b"a", Join("j", 2, K, 16), 0.0), ErrorCode.BAD_TOKEN, "token")
    only(cp.on_message(b"a", Join("j", 2, K, 16, "op"), 0.0), JoinOk)
    assert only(cp.on_message(b"x", StatsRequest(), 0.0), StatsReply).stats["jobs"] == {}
    assert len(only(cp.on_message(b"x", StatsRequest(token="op"), 0.0), StatsReply).stats["jobs"]) == 1


def test_full_job_refuses_a_newcomer_whatever_its_rank():
    cp = plane()
    only(cp.on_message(b"a", Join("j", 2, K, 16), 0.0), JoinOk)
    assert isinstance(cp.on_message(b"b", Join("j", 2, K, 16), 0.0)[0][1], JoinOk)
    for rank in (None, 0, 1):
        error(cp.on_message(b"thief", Join("j", 2, K, 16, rank=rank), 0.0), ErrorCode.JOB_FULL)


def test_name_is_bound_to_the_first_joins_parameters_and_token():
    cp = plane()
    only(cp.on_message(b"a", Join("j", 2, K, 16, "t"), 0.0), JoinOk)
    error(cp.on_message(b"b", Join("j", 3, K, 16, "t"), 0.0), ErrorCode.MISMATCH, "world_size")
    error(cp.on_message(b"b", Join("j", 2, K, 16, ""), 0.0), ErrorCode.BAD_TOKEN)


def test_client_with_token_against_a_switch_with_token(switch):
    endpoint, _ = switch(token="s3cret")
    with pytest.raises(JoinRejected) as info:
        SwitchClient(endpoint, "j", 1, config=FAST)
    assert info.value.field == "token"
    with SwitchClient(endpoint, "j", 1, config=FAST, token="s3cret") as c:
        np.testing.assert_array_equal(c.allreduce(np.arange(5, dtype=np.int32)), np.arange(5))


# ------------------------------------------------------------------------------ 3. call numbers


def test_call_check_compiled_and_numpy_agree():
    rng = np.random.default_rng(0)
    slots = 16
    checks = [CallCheck(slots, compiled=True), CallCheck(slots, compiled=False)]
    split_checks = [CallCheck(slots, compiled=True), CallCheck(slots, compiled=False)]
    for step in range(200):
        worker = int(rng.integers(2))
        chunks = np.arange(step * 4, step * 4 + 4)
        burst = make_burst(Kind.DATA, 3, worker, chunks % slots, (chunks // slots) % 2, chunks,
                           np.zeros((4, K), np.int32))
        burst["reserved"] = (chunks // 8) % 256
        if rng.random() < 0.05:
            burst["reserved"][int(rng.integers(4))] += 1
        results = [c.check(burst.copy(), 3, worker) for c in checks]
        assert results[0] == results[1]
        # The split layout's header words get the same answer (each check on its own table).
        heads = split_burst(burst)[0]
        if step % 2:  # as libzmq may hand a small frame over: at an odd address
            raw = bytearray(1 + heads.nbytes)
            raw[1:] = heads.tobytes()
            heads = np.frombuffer(memoryview(raw)[1:], np.int32).reshape(-1, 4)
            assert not heads.flags.aligned
        assert [c.check_split(heads, 3, worker) for c in split_checks] == results
        np.testing.assert_array_equal(checks[0].chunk, checks[1].chunk)


def test_skipped_call_aborts_the_job_naming_both_call_numbers(switch):
    endpoint, _ = switch()
    a, b = pair(endpoint, "drift")
    ones = np.ones(64, np.int32)
    allreduce_all([a, b], [ones, ones])
    # Rank 1 skipped step 1 (a non-finite gradient): its call numbers now run one behind.
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(a.allreduce, ones, call=2)
        fb = pool.submit(b.allreduce, ones, call=1)
        for f in (fa, fb):
            with pytest.raises(JobAborted) as info:
                f.result(timeout=10)
            assert "call 2" in str(info.value) and "call 1" in str(info.value), info.value
    a.close(), b.close()


def test_calls_of_different_sizes_abort_instead_of_wrong_sums(switch):
    endpoint, _ = switch()
    a, b = pair(endpoint, "sizes")
    # Rank 0 does 8 then 24 values, rank 1 does 24 then 8: same chunks, different calls.
    with ThreadPoolExecutor(2) as pool:
        f = [pool.submit(lambda c, n: [c.allreduce_async(np.ones(n, np.int32)),
                                       c.allreduce_async(np.ones(32 - n, np.int32))], c, n)
             for c, n in ((a, 8), (b, 24))]
        futures = [x for g in f for x in g.result()]
        with pytest.raises(JobAborted, match="mispaired"):
            for fut in futures:
                fut.result(timeout=10)
    a.close(), b.close()


# ------------------------------------------------------------------- 4. restarts and identities


@pytest.mark.slow
def test_restarted_switch_is_noticed_within_seconds(spawn):
    address = f"tcp://127.0.0.1:{free_port()}"
    argv = [PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
            "--liveness-timeout", "2", "--heartbeat-interval", "0.2"]
    first = spawn(argv)
    deadline = time.monotonic() + 30
    while True:
        try:
            probe(address, timeout=0.5)
            break
        except SwitchError:
            assert time.monotonic() < deadline, "switch did not start"
    with SwitchClient(address, "restart", 1, config=FAST) as c:
        c.allreduce(np.ones(8, np.int32))
        first.kill()  # a crash: no ABORT reaches the client
        first.wait(10)
        spawn(argv)
        wait_for_switch(address)  # the new switch is up (its start-up is slow on a loaded host)
        time.sleep(1)  # the client's heartbeats now reach it
        start = time.monotonic()
        with pytest.raises(JobAborted) as info:
            c.allreduce(np.ones(8, np.int32))
        assert time.monotonic() - start < 5
        assert "restart" in str(info.value), info.value


def test_heartbeat_ack_of_another_incarnation_fails_pending_calls(ctx):
    """A fake switch that answers JOIN, READY, then acks heartbeats as another incarnation."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    from switchagg.protocol import HeartbeatAck

    def serve():
        ident, _, _ = router.recv_multipart()
        ok = JoinOk("j", 1, 0, 2, K, 16, 0.1, 2.0, "aaaa")
        router.send_multipart([ident, FRAME_CONTROL, encode_control(ok)])
        router.send_multipart([ident, FRAME_CONTROL, encode_control(Ready(1))])
        while router.poll(3000):
            ident, kind, *rest = router.recv_multipart()  # data bursts may be split frames
            if kind == FRAME_CONTROL and b"HEARTBEAT" in rest[0]:
                router.send_multipart([ident, FRAME_CONTROL,
                                       encode_control(HeartbeatAck(1, "bbbb"))])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    c = SwitchClient(f"tcp://127.0.0.1:{port}", "j", 2, config=FAST)
    assert c.incarnation == "aaaa"
    with pytest.raises(JobAborted, match="restarted"):
        c.allreduce(np.ones(8, np.int32))
    with pytest.raises(JobAborted, match="restarted"):  # and every later call
        c.allreduce(np.ones(8, np.int32))
    c.close()
    thread.join(5)


def test_reconnected_identity_is_still_its_rank(ctx, switch):
    endpoint, _ = switch()

    def dealer():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"worker-7")
        sock.connect(endpoint)
        return sock

    first = dealer()
    first.send_multipart([FRAME_CONTROL, encode_control(Join("id", 1, K, 16))])
    assert isinstance(control(first), JoinOk)
    assert isinstance(control(first), Ready)
    # A new connection with the same identity (the client's reconnect after a TCP reset, the
    # old one not yet noticed as gone) takes the identity over: the switch still knows its rank.
    again = dealer()
    time.sleep(0.2)
    again.send_multipart([FRAME_CONTROL, encode_control(StatsRequest())])
    stats = control(again)
    assert isinstance(stats, StatsReply) and len(stats.stats["jobs"]) == 1  # still a member
    first.close()


# --------------------------------------------------------------------- 5. the client's own input


@pytest.mark.parametrize("address", ["foo://bar", "tcp://127.0.0.1", "tcp://127.0.0.1:70000",
                                     "tcp://:5555", "ipc://", 5555])
def test_client_refuses_a_bad_endpoint_before_starting(address):
    start = time.monotonic()
    with pytest.raises(ValueError, match="endpoint"):
        SwitchClient(address, "j", 1, config=FAST)
    assert time.monotonic() - start < 1


def test_check_endpoint_accepts_the_usual_forms():
    for ok in ("tcp://127.0.0.1:5555", "tcp://*:0", "tcp://switch.local:5555",
               "tcp://[::1]:5555", "ipc:///tmp/s.sock", "inproc://x"):
        assert check_endpoint(ok) == ok


def test_engine_crash_fails_the_pending_and_every_next_call_with_its_cause(switch):
    endpoint, _ = switch()
    c = SwitchClient(endpoint, "crash", 1, config=FAST)

    def broken(now):
        raise RuntimeError("injected engine fault")

    # The fault the engine must survive: any exception in its loop (it sends `transmit_frames`).
    c._machine.transmit_frames = broken
    for _ in range(2):
        with pytest.raises(SwitchError) as info:
            c.allreduce(np.ones(8, np.int32))
        assert isinstance(info.value.__cause__, RuntimeError), info.value
    c.close()


def test_error_about_its_own_job_fails_pending_calls_at_once(ctx, switch):
    endpoint, server = switch()
    a, b = pair(endpoint, "own")
    # The switch forgets rank 1's connection (as after a restart): its next data is refused.
    job = server.control.by_name["own"]
    server.control.members.pop(b.identity)
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        fb = pool.submit(b.allreduce, np.ones(8, np.int32))
        with pytest.raises(JobAborted, match="no longer counts"):
            fb.result(timeout=10)
    assert time.monotonic() - start < 3
    assert job is not None
    a.close(), b.close()


# ------------------------------------------------------------------------------- 6. memory bound


def send_burst(sock: zmq.Socket, burst: np.ndarray, layout: str) -> None:
    if layout == "split":
        sock.send_multipart([b"D", *split_burst(burst)], copy=False)
    else:
        sock.send_multipart([b"D", burst], copy=False)


def wait_for_switch(address: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe(address, timeout=0.5)
        except SwitchError:
            assert time.monotonic() < deadline, "switch did not start"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_switch_memory_stays_bounded_with_a_peer_that_never_reads(spawn, ctx, layout):
    """A peer heartbeats and streams 200 bursts of 1.1 MB but never reads its results: the
    switch's RSS grows by at most its byte budget plus slack, the peer's job is aborted for not
    reading, and another job is served meanwhile. Split bursts (what clients send) are answered
    split, interleaved ones interleaved: the budget holds on both paths."""
    address = f"tcp://127.0.0.1:{free_port()}"
    budget = int(os.environ.get("SWITCHAGG_TEST_BUDGET", 8 << 20))  # set it huge to see the leak
    proc = spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
                  "--liveness-timeout", "2", "--heartbeat-interval", "0.2",
                  "--peer-queue-bytes", str(budget)])
    wait_for_switch(address)
    honest = pair(address, "honest")
    allreduce_all(honest, [np.ones(64, np.int32)] * 2)
    before = rss_bytes(proc.pid)
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.RCVHWM, 1)
    rogue.setsockopt(zmq.RCVBUF, 4096)
    rogue.setsockopt(zmq.SNDTIMEO, 5000)
    rogue.connect(address)
    k, slots, n = 64, 4096, 4096
    rogue.send_multipart([FRAME_CONTROL, encode_control(Join("rogue", 1, k, slots))])
    ok = control(rogue)
    assert isinstance(ok, JoinOk) and isinstance(control(rogue), Ready)
    from switchagg.protocol import Heartbeat
    values = np.ones((n, k), np.int32)
    for i in range(200):
        chunks = np.arange(i * n, (i + 1) * n)
        burst = make_burst(Kind.DATA, ok.job_id, 0, chunks % slots, (chunks // slots) % 2,
                           chunks, values)
        send_burst(rogue, burst, layout)
        if i % 20 == 0:
            rogue.send_multipart([FRAME_CONTROL, encode_control(Heartbeat(ok.job_id, 0))])
            # The honest job goes on at its pace meanwhile.
            allreduce_all(honest, [np.full(64, i, np.int32)] * 2)
    for _ in range(15):  # past the liveness timeout over budget (alive: it heartbeats)
        rogue.send_multipart([FRAME_CONTROL, encode_control(Heartbeat(ok.job_id, 0))])
        time.sleep(0.2)
    for i in range(200, 205):
        chunks = np.arange(i * n, (i + 1) * n)
        burst = make_burst(Kind.DATA, ok.job_id, 0, chunks % slots, (chunks // slots) % 2,
                           chunks, values)
        send_burst(rogue, burst, layout)
    time.sleep(0.5)
    during = rss_bytes(proc.pid)
    stats = probe(address)
    rogue.close()
    time.sleep(0.5)
    after = rss_bytes(proc.pid)
    print(f"switch RSS before {before / 2**20:.0f} MiB, with the non-reader "
          f"{during / 2**20:.0f} MiB, after it left {after / 2**20:.0f} MiB "
          f"(budget {budget / 2**20:.0f} MiB; 200 bursts = {200 * burst.nbytes / 2**20:.0f} MiB)")
    assert during - before < 96 << 20, (before, during)
    assert stats["jobs_aborted"] >= 1 and stats["jobs_active"] == 1
    allreduce_all(honest, [np.ones(64, np.int32)] * 2)  # still served
    for c in honest:
        c.close()


# ------------------------------------------------------------------------------------ 7. CURVE


def test_curve_keygen_and_an_encrypted_job_on_loopback(switch, tmp_path, capsys):
    from switch_emulator.cli import main
    from switchagg import SwitchTimeout

    assert main(["keygen", str(tmp_path)]) == 0
    public, secret = tmp_path / "switch.key", tmp_path / "switch.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600" and "public key" in capsys.readouterr().out
    endpoint, _ = switch(curve_secret_file=str(secret))
    with SwitchClient(endpoint, "curve", 1, config=FAST, server_key=str(public)) as c:
        np.testing.assert_array_equal(c.allreduce(np.arange(50, dtype=np.int32)), np.arange(50))
    # Without the key (or with another switch's) the handshake fails: no JOIN reaches the switch.
    quick = ClientConfig(k=8, slots=16, burst=4, join_timeout=1, op_timeout=1)
    with pytest.raises(SwitchTimeout):
        SwitchClient(endpoint, "curve2", 1, config=quick)
    other = zmq.curve_keypair()[0].decode()
    with pytest.raises(SwitchTimeout):
        SwitchClient(endpoint, "curve3", 1, config=quick, server_key=other)


def test_curve_bad_key_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="keygen"):
        SwitchClient("tcp://127.0.0.1:1", "j", 1, config=FAST, server_key=str(tmp_path / "nope"))
    with pytest.raises(Exception, match="curve_secret_file"):
        SwitchConfig(curve_secret_file=str(tmp_path / "nope"))


def test_probe_reaches_a_curve_switch_with_its_key(switch, tmp_path):
    from switch_emulator._keys import keygen
    from switchagg import SwitchTimeout

    public, secret = keygen(str(tmp_path))
    endpoint, _ = switch(curve_secret_file=secret)
    assert probe(endpoint, server_key=public)["jobs_active"] == 0
    with pytest.raises(SwitchTimeout):
        probe(endpoint, timeout=0.5)


class ResettingProxy:
    """A TCP relay between a worker and the switch whose connections can be reset (RST)."""

    def __init__(self, upstream_port: int) -> None:
        import socket as socketlib
        self.socketlib = socketlib
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socketlib.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.pairs: list = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                continue
            up = self.socketlib.create_connection(self.upstream)
            with self.lock:
                self.pairs.append((down, up))
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def reset(self) -> None:
        """Close every relayed connection with an RST, as a flaky link or middlebox would."""
        import struct
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.setsockopt(self.socketlib.SOL_SOCKET, self.socketlib.SO_LINGER,
                                 struct.pack("ii", 1, 0))
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.reset()
        self.listener.close()


def test_a_tcp_reset_does_not_cost_the_job(switch):
    endpoint, _ = switch()
    proxy = ResettingProxy(int(endpoint.rsplit(":", 1)[1]))
    try:
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(SwitchClient, endpoint, "reset", 2, 0, config=FAST)
            fb = pool.submit(SwitchClient, f"tcp://127.0.0.1:{proxy.port}", "reset", 2, 1,
                             config=FAST)
            a, b = fa.result(), fb.result()
        data = [np.arange(100, dtype=np.int32), np.full(100, 7, np.int32)]
        for got in allreduce_all([a, b], data):
            np.testing.assert_array_equal(got, data[0] + data[1])
        proxy.reset()  # rank 1's connection dies; ZeroMQ reconnects with the same identity
        time.sleep(0.3)
        for step in range(3):
            for got in allreduce_all([a, b], data):
                np.testing.assert_array_equal(got, data[0] + data[1])
        a.close(), b.close()
    finally:
        proxy.close()
