"""SwarmSGD's peer side: graphs, the wire format, pure gossip reaching consensus, malformed
messages, a slow peer and a killed peer (the rest go on)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from switchagg.swarm import graph, lattice, wire
from switchagg.swarm.node import NodeConfig, SwarmNode
from tests.conftest import REPO, rss_bytes

# ------------------------------------------------------------------------------------- graph


@pytest.mark.parametrize("kind,n,degree,expect", [("complete", 5, None, 4), ("ring", 6, None, 2),
                                                  ("ring", 2, None, 1), ("regular", 8, 3, 3),
                                                  ("regular", 7, 4, 4), ("complete", 1, None, 0)])
def test_graphs_are_regular_symmetric_and_loop_free(kind, n, degree, expect):
    nb = graph.neighbours(kind, n, degree=degree, seed=5)
    assert len(nb) == n
    for i, row in enumerate(nb):
        assert len(row) == expect and i not in row and len(set(row)) == len(row)
        assert all(i in nb[j] for j in row)


def test_random_regular_graph_is_the_same_for_the_same_seed_and_rejects_impossible_degrees():
    assert graph.neighbours("regular", 10, degree=3, seed=1) == graph.neighbours("regular", 10, degree=3, seed=1)
    for n, degree in ((5, 3), (4, 4), (4, 1)):
        with pytest.raises(ValueError, match="regular graph"):
            graph.neighbours("regular", n, degree=degree)
    with pytest.raises(ValueError, match="complete, ring, regular"):
        graph.neighbours("star", 4)

# -------------------------------------------------------------------------------------- wire


def _frames(**kw):
    msg = wire.Message(**{"kind": wire.Kind.EXCHANGE, "sender": 1, "seq": 9, **kw})
    return wire.to_frames(msg, job=wire.job_id("j"), world=4)


def test_wire_round_trips_full_lattice_and_control_messages():
    x = np.linspace(-1, 1, 10)
    code = lattice.encode(x, 0.01, 4, rng=None)
    for model in (x.astype(np.float32), code):
        msg = wire.from_frames(_frames(model=model, ttl_ms=1500), job=wire.job_id("j"), world=4, numel=10)
        assert msg.kind == wire.Kind.EXCHANGE and msg.sender == 1 and msg.seq == 9 and msg.ttl_ms == 1500
        if isinstance(model, lattice.LatticeCode):
            assert msg.model == code
        else:
            np.testing.assert_array_equal(msg.model, model)
    msg = wire.from_frames(_frames(kind=wire.Kind.DECLINE, reason=wire.Reason.FINISHED),
                           job=wire.job_id("j"), world=4, numel=10)
    assert msg.reason == wire.Reason.FINISHED and msg.model is None


def _corrupt(frames, offset, value):
    head = bytearray(frames[0])
    head[offset] = value
    return [bytes(head), frames[1]]


BAD_MESSAGES = {
    "frames": lambda f: f[:1],
    "header": lambda f: [f[0][:-1], f[1]],
    "magic": lambda f: _corrupt(f, 0, 0),
    "version": lambda f: _corrupt(f, 1, 9),
    "kind": lambda f: _corrupt(f, 2, 77),
    "reason": lambda f: _corrupt(f, 3, 1),
    "sender": lambda f: _corrupt(f, 4, 4),
    "world": lambda f: _corrupt(f, 6, 5),
    "job": lambda f: _corrupt(f, 8, f[0][8] ^ 1),
    "numel": lambda f: _corrupt(f, 20, 11),
    "encoding": lambda f: _corrupt(f, 28, 7),
    "payload": lambda f: [f[0], f[1][:-4]],
}


@pytest.mark.parametrize("field", list(BAD_MESSAGES))
def test_wire_names_the_bad_field(field):
    frames = BAD_MESSAGES[field](_frames(model=np.zeros(10, np.float32)))
    with pytest.raises(wire.WireError) as info:
        wire.from_frames(frames, job=wire.job_id("j"), world=4, numel=10)
    assert info.value.field == field


def test_wire_rejects_bad_lattice_fields_and_non_finite_models():
    code = lattice.encode(np.zeros(10), 0.1, 8, rng=None)
    frames = _frames(model=code)
    for offset, value, field in ((29, 5, "bits"),):
        with pytest.raises(wire.WireError) as info:
            wire.from_frames(_corrupt(frames, offset, value), job=wire.job_id("j"), world=4, numel=10)
        assert info.value.field == field
    bad_side = wire.to_frames(wire.Message(wire.Kind.REPLY, 0, 1, model=lattice.LatticeCode(
        8, float("nan"), 10, code.codes, code.check)), job=wire.job_id("j"), world=4)
    with pytest.raises(wire.WireError, match="side"):
        wire.from_frames(bad_side, job=wire.job_id("j"), world=4, numel=10)
    nan = np.zeros(10, np.float32)
    nan[3] = np.nan
    with pytest.raises(wire.WireError, match="non-finite"):
        wire.from_frames(_frames(model=nan), job=wire.job_id("j"), world=4, numel=10)

# ------------------------------------------------------------------------------ nodes in-process


class _Swarm:
    """n nodes in this process on numpy models (no gradient), complete graph unless told."""

    def __init__(self, models, config=None, kind="complete"):
        self.models = [np.array(m, dtype=np.float64) for m in models]
        n, d = len(self.models), self.models[0].size
        nb = graph.neighbours(kind, n)
        self.nodes = []
        for i in range(n):
            self.nodes.append(SwarmNode(i, n, nb[i], self._reader(i), self._adder(i), numel=d,
                                        job="test", config=config or NodeConfig(timeout=2.0), seed=i))
        for node in self.nodes:
            node.connect([x.address for x in self.nodes])
            node.start()

    def _reader(self, i):
        return lambda: self.models[i].copy()

    def _adder(self, i):
        def add(delta):
            self.models[i] += delta
        return add

    def run(self, turns, ranks=None):
        def loop(node):
            for _ in range(turns):
                node.interact()
        threads = [threading.Thread(target=loop, args=(self.nodes[r],))
                   for r in (ranks if ranks is not None else range(len(self.nodes)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)

    def spread(self):
        avg = np.mean(self.models, 0)
        return float(np.mean([np.linalg.norm(m - avg) for m in self.models]))

    def close(self):
        for node in self.nodes:
            node.close()


@pytest.fixture
def swarm_factory():
    made = []

    def make(*args, **kwargs):
        s = _Swarm(*args, **kwargs)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("quant", ["none", "lattice"])
def test_pure_gossip_reaches_consensus_at_the_initial_mean(swarm_factory, quant):
    rng = np.random.default_rng(0)
    models = rng.normal(size=(6, 500))
    mean0 = models.mean(0)
    swarm = swarm_factory(models, NodeConfig(quant=quant, timeout=5.0))
    spread0 = swarm.spread()
    swarm.run(40)
    assert swarm.spread() < 1e-6 * spread0
    drift = np.abs(np.mean(swarm.models, 0) - mean0).max()
    if quant == "none":
        assert drift < 1e-6   # float32 copies: exact up to their rounding
    else:
        # unbiased lattice noise only: far below the initial spread of the models
        assert drift < 0.1 * np.abs(models - mean0).max()
    stats = [n.stats for n in swarm.nodes]
    assert sum(s.interactions for s in stats) == 6 * 40 == sum(s.served for s in stats)
    assert all(s.timeouts == 0 and s.malformed == 0 and s.errors == 0 for s in stats)
    if quant == "lattice":
        full = 4 * 500
        # most model messages are codes of 8 bits per coordinate, a quarter of a full copy
        sent = sum(s.bytes_sent for s in stats)
        assert sent < 0.6 * full * sum(s.messages_sent for s in stats)


def test_pure_gossip_on_a_ring_reaches_consensus(swarm_factory):
    rng = np.random.default_rng(1)
    swarm = swarm_factory(rng.normal(size=(6, 100)), NodeConfig(quant="none"), kind="ring")
    spread0 = swarm.spread()
    swarm.run(60)
    assert swarm.spread() < 1e-4 * spread0


def test_a_reply_decodes_against_the_snapshot_however_far_the_model_moved_meanwhile(swarm_factory):
    """The reply's side fits the distance to the snapshot the peer answered; local steps taken
    while the interaction is under way (here one far larger than that) must not fail its decode."""
    models = np.zeros((2, 50))
    models[1] += 1.0
    swarm = swarm_factory(models, NodeConfig(quant="lattice", bits=16))
    a, b = swarm.nodes
    assert a.interact(1) == "averaged"            # the bootstrap: full copies, both at 0.5
    swarm.models[1] += 0.01                        # b's reply will be a code of radius ~0.04
    assert a.begin(1) is None
    with a.lock:                                   # a 'local step' while b answers
        swarm.models[0] += 100.0
    outcome = None
    deadline = time.monotonic() + 10
    while outcome is None and time.monotonic() < deadline:
        outcome = a.poll(timeout=0.1)
    assert outcome == "averaged"
    assert a.stats.decode_failures == 0 and a.stats.fallbacks == 0 and b.stats.fallbacks == 0
    # the average relative to the snapshot (0.5 and 0.51), the step kept on top of it
    np.testing.assert_allclose(swarm.models[0], 100.5 + 0.005, atol=1e-3)
    np.testing.assert_allclose(swarm.models[1], 0.505, atol=1e-3)


def test_a_started_node_answers_before_it_knows_its_peers(swarm_factory):
    """Answering needs no addresses (train_swarm starts it before the rendezvous ends)."""
    models = np.zeros((2, 20))
    models[1] += 1.0
    reads = [lambda: models[0].copy(), lambda: models[1].copy()]

    def adder(i):
        def add(delta):
            models[i] += delta
        return add
    cfg = NodeConfig(quant="none", timeout=5.0)
    with SwarmNode(1, 2, [0], reads[1], adder(1), numel=20, job="test", config=cfg) as b, \
            SwarmNode(0, 2, [1], reads[0], adder(0), numel=20, job="test", config=cfg) as a:
        b.start()                                  # never connected
        a.connect({1: b.address})
        a.start()
        assert a.interact(1) == "averaged"
        np.testing.assert_allclose(models, 0.5)


def test_a_failed_decode_falls_back_to_a_full_copy_and_still_averages(swarm_factory):
    models = np.zeros((2, 50))
    models[1] += 1.0
    swarm = swarm_factory(models, NodeConfig(quant="lattice", bits=16))
    a, b = swarm.nodes
    assert a.interact(1) == "averaged" and a.stats.bootstrap_full == 1
    # b's reply is a code with a side of 4 * 1 / (2^16 - 2): a lands within one side of b
    np.testing.assert_allclose(swarm.models[0], swarm.models[1], atol=1e-4)
    # a now expects a distance of ~1e-4 (its code's radius is twice that); make b 1e6x farther.
    swarm.models[1] += 100.0
    assert a.interact(1) == "averaged"
    assert b.stats.decode_failures == 1 and a.stats.fallbacks == 1
    np.testing.assert_allclose(swarm.models[0], 50.5, atol=0.01)
    np.testing.assert_allclose(swarm.models[1], 50.5, atol=0.01)


def _raw_peer(node):
    """A bare DEALER connected to `node`, and a valid EXCHANGE from rank 0 of a 2-node job."""
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(node.address)
    good = wire.to_frames(wire.Message(wire.Kind.EXCHANGE, 0, 1, model=np.zeros(10, np.float32)),
                          job=wire.job_id("test"), world=2)
    return raw, good


def test_malformed_messages_are_counted_and_dropped_and_the_node_keeps_working(swarm_factory):
    swarm = swarm_factory(np.random.default_rng(2).normal(size=(2, 10)), NodeConfig(quant="none"))
    node = swarm.nodes[1]
    raw, good = _raw_peer(node)
    garbage = [[b"hello"], [b"\x00" * 48, b""], [b"x" * 3, b"y", b"z"], BAD_MESSAGES["magic"](good),
               BAD_MESSAGES["payload"](good), BAD_MESSAGES["job"](good), [good[0], b"\xff" * 40]]
    for frames in garbage:
        raw.send_multipart(frames)
    deadline = time.monotonic() + 10
    while node.stats.malformed < len(garbage) and time.monotonic() < deadline:
        time.sleep(0.01)
    raw.close()
    assert node.stats.malformed == len(garbage) and node.stats.errors == 0
    assert node.stats.served == 0
    assert swarm.nodes[0].interact(1) == "averaged"
    np.testing.assert_allclose(swarm.models[0], swarm.models[1], atol=1e-6)


def test_a_slow_peer_is_declined_within_the_timeout_and_others_go_on(swarm_factory):
    rng = np.random.default_rng(3)
    swarm = swarm_factory(rng.normal(size=(3, 20)), NodeConfig(quant="none", timeout=1.0))
    a, slow, _ = swarm.nodes
    before = swarm.models[1].copy()
    release = threading.Event()

    def long_step():
        with slow.lock:   # a 'training step' far longer than the peers' patience
            release.wait(10)
    holder = threading.Thread(target=long_step)
    holder.start()
    try:
        t0 = time.monotonic()
        assert a.interact(1) == "declined"   # after half its ttl, not after the 10 s step
        assert time.monotonic() - t0 < 2.0
        assert slow.stats.expired == 1
        t0 = time.monotonic()
        assert a.interact(2) == "averaged"
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        holder.join()
    np.testing.assert_array_equal(swarm.models[1], before)   # nobody averaged one-sidedly with it
    assert 1 not in a.stats.dead_peers


def test_a_finished_peer_declines_and_is_not_picked_again(swarm_factory):
    swarm = swarm_factory(np.zeros((2, 5)))
    swarm.nodes[1].finish()
    assert swarm.nodes[0].interact() == "declined"
    assert swarm.nodes[0].stats.finished_peers == [1]
    assert swarm.nodes[0].interact() == "no-peer"


def test_node_config_rejects_bad_values():
    for kw, name in (({"quant": "qsgd"}, "quant"), ({"bits": 3}, "quant_bits"), ({"margin": 0}, "margin"),
                     ({"timeout": 0}, "timeout"), ({"dead_after": 0}, "dead_after")):
        with pytest.raises(ValueError, match=name):
            NodeConfig(**kw).validate()

# ----------------------------------------------------------------------------- a killed process


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_killed_peer_is_skipped_and_reported_and_the_others_finish(spawn, tmp_path):
    world, turns, victim = 4, 60, 3
    script = os.path.join(REPO, "tests", "swarm_gossip_worker.py")
    import subprocess
    procs = [spawn([sys.executable, script, str(r), str(world), str(tmp_path), str(turns)],
                   stdout=subprocess.PIPE, text=True) for r in range(world)]
    assert procs[victim].stdout.readline().strip() == "started"
    time.sleep(0.2)
    os.killpg(procs[victim].pid, signal.SIGKILL)
    t0 = time.monotonic()
    for r, proc in enumerate(procs):
        if r != victim:
            assert proc.wait(timeout=60) == 0, r
    elapsed = time.monotonic() - t0
    results = [json.loads((tmp_path / f"result.{r}.json").read_text())
               for r in range(world) if r != victim]
    for res in results:
        stats = res["stats"]
        assert stats["dead_peers"] == [victim], stats
        # each survivor lost dead_after (2) timeouts of 1 s to the victim, and then skipped it
        # (one more to a live peer starved of CPU is tolerated: the machine may be loaded)
        assert 2 <= stats["timeouts"] <= 3 and stats["errors"] == 0
        assert res["outcomes"].get("averaged", 0) >= turns // 2   # the rest: peers that finished
    assert elapsed < 20
    # the survivors kept averaging among themselves: their models are close
    models = np.array([res["model"] for res in results])
    assert np.abs(models - models.mean(0)).max() < 1e-3

# ------------------------------------------------------------------- bounds on what peers send


def test_a_frame_larger_than_any_valid_message_never_reaches_the_node(swarm_factory):
    """libzmq drops a connection whose frame exceeds `wire.max_frame` before buffering it: the
    node never sees it (not even as malformed), and other peers go on."""
    swarm = swarm_factory(np.random.default_rng(4).normal(size=(2, 10)), NodeConfig(quant="none"))
    node = swarm.nodes[1]
    assert wire.max_frame(10) == wire.HEADER.size
    raw, good = _raw_peer(node)
    for _ in range(5):
        raw.send_multipart([good[0], b"\0" * (8 << 20)])   # 8 MiB where 40 bytes are valid
    time.sleep(0.3)
    raw.close()
    assert node.stats.messages_received == 0 and node.stats.errors == 0
    assert swarm.nodes[0].interact(1) == "averaged"


def test_a_peer_that_floods_requests_and_never_reads_holds_bounded_memory(swarm_factory):
    """A peer sends full-model EXCHANGEs as fast as its socket takes them for 2 s and reads
    nothing: the node's queues hold at most QUEUED messages each way, so this process grows by
    far less than what was offered, and a third node still averages with the flooded one."""
    from switchagg.swarm.node import QUEUED
    d = 250_000   # 1 MB per full model
    swarm = swarm_factory(np.zeros((3, d)), NodeConfig(quant="none", timeout=5.0))
    flooded = swarm.nodes[1]
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 1), (zmq.RCVHWM, 1),
                          (zmq.RCVBUF, 4096)):
        rogue.setsockopt(option, value)
    rogue.connect(flooded.address)
    frames = wire.to_frames(wire.Message(wire.Kind.EXCHANGE, 2, 1, model=np.zeros(d, np.float32),
                                         ttl_ms=5000), job=wire.job_id("test"), world=3)
    before = rss_bytes(os.getpid())
    offered, deadline = 0, time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            rogue.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            offered += 1
        except zmq.Again:
            time.sleep(0.001)
    grown = rss_bytes(os.getpid()) - before
    print(f"flood: {offered} requests of {4 * d / 2**20:.1f} MiB offered, served "
          f"{flooded.stats.served}; RSS grew {grown / 2**20:.0f} MiB (bound per connection: "
          f"{QUEUED} x {4 * d / 2**20:.1f} MiB each way)")
    # Unbounded (libzmq's default queues of 1000 messages) it grew by over 600 MiB here.
    assert grown < 128 << 20, grown
    assert swarm.nodes[0].interact(1) == "averaged"   # bounded waits: others are still served
    assert flooded.stats.errors == 0
    rogue.close()


def test_connect_refuses_an_address_that_is_not_an_endpoint(swarm_factory):
    swarm = swarm_factory(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="endpoint"):
        swarm.nodes[0].connect({0: swarm.nodes[0].address, 1: "not an address"})
