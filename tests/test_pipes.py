"""`switch-emulator --pipes P`: exact sums with P = 1 and 2, one control plane, greetings checked.

The switch runs in a thread (its pipes are real processes it spawns); workers are `SwitchClient`s
in threads. No timing is asserted.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from conftest import run_clients
from switch_emulator._config import ConfigError, SwitchConfig
from switchagg import ClientConfig, JobAborted, SwitchClient
from switchagg._stream import StreamMachine, array_fill
from switchagg.packet import pipe_bounds
from switchagg.protocol import (FRAME_CONTROL, Error, PipeHello, decode_control,
                                encode_control)

pytestmark = pytest.mark.timeout(90)

CONFIG = ClientConfig(k=8, slots=64, burst=8, join_timeout=30, op_timeout=15, rto_min=0.01)


@pytest.fixture
def switch(switch_thread):
    """Start a switch (with `pipes`) in a thread; stopped, pipes and all, at the end."""
    return lambda pipes: switch_thread(pipes=pipes, log_level="WARNING")


def _run_workers(endpoint: str, job: str, n: int, body) -> tuple[list, list]:
    return run_clients(endpoint, job, n, body, CONFIG)


@pytest.mark.parametrize("pipes", [1, 2])
def test_pipes_give_exact_wrapping_sums(switch, pipes):
    server = switch(pipes)
    sizes = [1, 7, 8, 64 * 8, 64 * 8 * 3 + 5, 10_000]
    rng = np.random.default_rng(pipes)
    inputs = {(r, i): rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
              for r in range(3) for i, n in enumerate(sizes)}

    def body(client, rank):
        sums = [client.allreduce(inputs[(rank, i)]) for i in range(len(sizes))]
        jobs = server.control.stats()["jobs"]
        return sums, sum(j["packets_in"] for j in jobs.values())

    results, errors = _run_workers(server.endpoint, "pipes", 3, body)
    assert not errors, errors
    for i in range(len(sizes)):
        expected = inputs[(0, i)] + inputs[(1, i)] + inputs[(2, i)]  # int32 wraps
        for sums, _ in results:
            np.testing.assert_array_equal(sums[i], expected)
    # With pipes every data packet went to them; without, to the main socket.
    main_packets = max(packets for _, packets in results)
    assert (main_packets == 0) if pipes > 1 else (main_packets > 0)


def test_pipes_keep_one_control_plane_an_abort_reaches_everyone(switch):
    server = switch(2)
    left = threading.Event()

    def body(client, rank):
        client.allreduce(np.ones(1000, np.int32))  # both joined and streaming through pipes
        if rank == 1:
            client.close(reason="rank 1 gives up")
            left.set()
            return None
        left.wait(10)
        with pytest.raises(JobAborted, match="rank 1 gives up"):
            client.allreduce(np.ones(100_000, np.int32))
        return "aborted"

    results, errors = _run_workers(server.endpoint, "abort", 2, body)
    assert not errors, errors
    assert results[0] == "aborted"


def test_pipe_refuses_a_greeting_with_the_wrong_key(switch):
    server = switch(2)
    with SwitchClient(server.endpoint, "keys", 1, config=CONFIG) as client:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(server.pipes.endpoints[1])
            sock.send_multipart([FRAME_CONTROL, encode_control(
                PipeHello(client.job_id, client.rank, "not-the-key"))])
            assert sock.poll(5000), "the pipe did not answer"
            kind, body = sock.recv_multipart()
            reply = decode_control(body)
            assert kind == FRAME_CONTROL and isinstance(reply, Error)
            assert reply.code == "rejected" and reply.field == "key"
        finally:
            sock.close()
        np.testing.assert_array_equal(client.allreduce(np.arange(50, dtype=np.int32)),
                                      np.arange(50, dtype=np.int32))


@pytest.mark.parametrize("overrides", [{"drop_ingress": 0.1}, {"dataplane": "golden"},
                                       {"pipes": 0}, {"pipes": 17}])
def test_pipes_config_is_checked(overrides):
    with pytest.raises(ConfigError, match="pipes"):
        SwitchConfig(**{"pipes": 2, **overrides})


@pytest.mark.parametrize("slots, pipes", [(16, 2), (17, 3), (8, 8)])
def test_first_send_bursts_never_straddle_a_pipe_range(slots, pipes):
    m = StreamMachine(job_id=0, rank=0, k=8, slots=slots, burst=slots, pipes=pipes)
    m.submit(3 * slots * 8, array_fill(np.zeros(3 * slots * 8, np.int32), 8), 0.0)
    bounds = pipe_bounds(slots, pipes)
    frames = m.transmit_frames(0.0)
    assert sum(len(h) for h, _ in frames) == slots
    for heads, _ in frames:
        slot = heads[:, 2] & 0x7FFF
        pipe = np.searchsorted(bounds, slot, side="right") - 1
        assert (pipe == pipe[0]).all()


def test_pipes_abort_a_job_whose_calls_are_mispaired(switch):
    """The call check runs in the pipes too: rank 1 numbers its call 1, rank 0 numbers it 2, and
    both get the abort naming both numbers instead of wrong sums."""
    server = switch(2)

    def body(client, rank):
        with pytest.raises(JobAborted, match="mispaired") as info:
            client.allreduce(np.ones(2000, np.int32), call=2 - rank)
        return str(info.value)

    results, errors = _run_workers(server.endpoint, "drift", 2, body)
    assert not errors, errors
    assert all("call 2" in text and "call 1" in text for text in results), results
    assert server.control.counters["mispaired"] == 1


@pytest.mark.parametrize("overrides", [dict(token="s3cret"), dict(curve_secret_file=__file__)])
def test_pipes_accept_a_token_and_curve(overrides):
    # The pipes carry both (tests/test_pipes_hardening.py runs a job through them).
    assert SwitchConfig(pipes=2, **overrides).pipes == 2
