"""One SwarmSGD worker's peer side: its socket, the thread that answers peers, and the interaction.

What it owns: the ZeroMQ sockets of one worker (one ROUTER it binds and every peer reaches, one
DEALER per peer it talks to), the answering thread, the pairwise exchange protocol (`wire`'s
messages), peer liveness, and the counters of all of it (`NodeStats`). What it must never do:
know about torch or training (the model is two callbacks: `read()` a flat vector, `add(delta)`
to it), wait without a bound, let a peer's bytes raise anything (malformed messages are counted
and dropped), or wait for all the other workers (there is no global barrier).

How one interaction goes (initiator i, responder j; x and y their models):
  1. i snapshots x and sends EXCHANGE(seq, Q(x)). Q is the lattice code with a side picked from
     the last distance i saw to a peer (`lattice.side_for`, `margin`); the first exchange, and
     any with `quant="none"`, sends a full float32 copy.
  2. j's answering thread receives it at once, even while j's trainer is mid-step; it then takes
     j's model lock (the trainer holds it during each local step, through `step_lock`, which lets
     a waiting peer in first, so this waits for at most one step). If it could not get the lock within half the request's ttl, it declines (EXPIRED)
     rather than average with a peer that has stopped waiting. It decodes Q(x) against y: a
     failed decode check answers NEED_FULL and i resends x in full (a counted fallback).
     Otherwise j moves to the average, y <- y + (x^ - y)/2, remembers y, and replies REPLY(Q(y)),
     with a side picked from the distance it just measured, |x^ - y|_inf.
  3. i decodes Q(y) against its snapshot x, which y is within the code's radius of (j picked
     the side from |x^ - y|; i's current model may have moved farther meanwhile), RESEND
     fetching y in full if that fails, and moves by the same rule relative to its snapshot:
     x <- x + (y^ - x)/2. With exact copies the pair's sum is unchanged, even if i's own
     answering thread averaged with a third worker meanwhile; with the unbiased lattice it is
     unchanged in expectation.
`interact` does all of it before returning; `begin` (step 1) and `poll` (step 3, as answers come)
let the caller go on computing in between, the non-blocking variant: the delta form of step 3
keeps i's local steps taken since the snapshot on top of the average.
Every wait is bounded by `timeout`. A peer that does not answer in time is a timeout; after
`dead_after` timeouts in a row it is declared dead, reported and never picked again, and the rest
go on. A request that arrives after its initiator gave up may still be served (averaging on one
side only); `timeouts` counts the interactions where that can have happened.

Bounds on what peers send (`_peer_socket`): every socket refuses a frame larger than the
largest valid one (`wire.max_frame`: the header, or a full float32 model of this run's size;
libzmq drops the peer's connection before buffering it), and queues at most `QUEUED` messages
each way per connection (the protocol has at most two in flight: an interaction's request and
its full-copy follow-up), so a peer that floods requests, or never reads its replies, holds at
most QUEUED x max_frame bytes of this node per connection (a reply past it is dropped, as a lost
one; the peer times out). What arrives is then checked field by field (`wire.from_frames`:
sizes, kinds, ranks, job, finite values) before anything uses it; a bad one is counted and
dropped. Addresses are checked when learnt (`connect`).

The answering thread owns the ROUTER; the caller's thread owns the DEALERs (ZeroMQ sockets are not
thread-safe). Counters are updated under a small lock of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import zmq

from switchagg._limits import check_endpoint
from switchagg.swarm import lattice
from switchagg.swarm.settings import NodeConfig, NodeStats
from switchagg.swarm.wire import (
    Kind,
    Message,
    Reason,
    WireError,
    from_frames,
    job_id,
    max_frame,
    to_frames,
)

__all__ = ["NodeConfig", "NodeStats", "SwarmNode"]

log = logging.getLogger("switchagg.swarm")

#: Messages each socket queues per connection, each way (see the module essay).
QUEUED = 8


def _peer_socket(ctx: zmq.Context, kind: int, max_frame: int) -> zmq.Socket:
    """A socket that talks to peers: frames bounded by `max_frame`, queues by QUEUED."""
    sock = ctx.socket(kind)
    for option, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, max_frame), (zmq.SNDHWM, QUEUED),
                          (zmq.RCVHWM, QUEUED)):
        sock.setsockopt(option, value)
    return sock

@dataclass
class _Pending:
    """The interaction this node started and has not finished."""

    peer: int
    seq: int
    x: np.ndarray          # the snapshot that was sent
    sock: zmq.Socket
    deadline: float        # monotonic time at which it times out
    ttl_ms: int
    started: float = field(default_factory=time.monotonic)
    resent: bool = False   # a full copy already followed a NEED_FULL


class SwarmNode:
    """A worker's endpoint in the swarm.

    Args:
        rank, world: this worker and the number of workers.
        neighbours: the ranks this worker may start interactions with (`graph.neighbours`).
        read: returns this worker's model as a flat float vector (a copy).
        add: adds a flat float64 delta to this worker's model in place.
        numel: the model's size (every worker's is the same).
        job: the job name (messages of other jobs are refused).
        config: see NodeConfig.
        seed: seeds the choice of peers and the lattice's stochastic rounding (give each rank
            its own).
        host: the address to bind on (and advertise): 127.0.0.1 on one machine.

    `read` and `add` are only ever called with `lock` held; the caller holds it while it changes
    the model itself (a training step: `with node.step_lock(): ...`). Use as a context manager, or call `close()`.

    Example:
        node = SwarmNode(rank, n, nbrs, read, add, numel=d, job="run1")
        node.start()                            # answer peers from the moment they can know us
        addresses[rank] = node.address          # publish (e.g. through a TCPStore)
        node.connect(addresses)                 # once every address is known
        ... with node.step_lock(): local_step() ...;  node.interact()
    """

    def __init__(self, rank: int, world: int, neighbours, read, add, *, numel: int,
                 job: str = "swarm", config: NodeConfig | None = None, seed: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.rank, self.world, self.numel = rank, world, int(numel)
        self.neighbours = tuple(int(j) for j in neighbours)
        self.config = (config or NodeConfig()).validate()
        self._read, self._add = read, add
        self.lock = threading.Lock()
        self._peer_waiting = threading.Event()   # the answering thread wants the lock
        self.stats = NodeStats()
        self._stats_lock = threading.Lock()
        self._job = job_id(job)
        self._rng = np.random.default_rng(seed)               # peer choice (caller's thread)
        self._serve_rng = np.random.default_rng([seed, 1])    # rounding (answering thread)
        self._ctx = zmq.Context()
        self._max_frame = max_frame(self.numel)
        self._router = _peer_socket(self._ctx, zmq.ROUTER, self._max_frame)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._addresses: dict[int, str] = {}
        self._dealers: dict[int, zmq.Socket] = {}
        self._failures: dict[int, int] = {}
        self._dead: set[int] = set()
        self._finished_peers: set[int] = set()
        self._saved: dict[int, tuple[int, np.ndarray]] = {}   # sender -> (seq, y it was sent)
        self._distance: float | None = None
        self._seq = 0
        self._pending: _Pending | None = None
        self._finished = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    def connect(self, addresses) -> None:
        """Learn the peers' addresses (rank -> address, a dict or a list indexed by rank).

        Raises:
            ValueError: an address is not a ZeroMQ endpoint, or a neighbour has none.
        """
        items = addresses.items() if isinstance(addresses, dict) else enumerate(addresses)
        self._addresses = {int(r): check_endpoint(a) for r, a in items if int(r) != self.rank}
        missing = [j for j in self.neighbours if j not in self._addresses]
        if missing:
            raise ValueError(f"rank {self.rank}: no address for neighbour(s) {missing}")

    def start(self) -> None:
        """Start answering peers (in a daemon thread). Answering needs no addresses: call it
        before publishing this node's, so that a peer that learns it first is served at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"swarm-serve-{self.rank}",
                                            daemon=True)
            self._thread.start()

    def finish(self) -> None:
        """Stop averaging: from now on exchange requests are declined (FINISHED)."""
        self._finished.set()

    def close(self) -> None:
        """Stop the answering thread (bounded wait) and close every socket."""
        if self._closed:
            return
        self._closed = True
        self._finished.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 10 * self.config.poll_ms / 1e3))
            if self._thread.is_alive():
                log.warning("rank %d: the answering thread did not stop; closing anyway", self.rank)
        for s in self._dealers.values():
            s.close(linger=0)
        self._dealers.clear()
        self._router.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> SwarmNode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def step_lock(self, patience: float = 0.05):
        """Hold the model lock for one local step, letting a waiting peer's averaging in first.

        Python's Lock is not fair: a training loop that takes it again right after releasing it
        would starve the answering thread for many steps. So when the answering thread waits,
        this yields to it (at most `patience` seconds) before taking the lock.
        """
        deadline = time.monotonic() + patience
        while self._peer_waiting.is_set() and time.monotonic() < deadline:
            time.sleep(1e-4)
        with self.lock:
            yield

    @property
    def live_neighbours(self) -> list[int]:
        return [j for j in self.neighbours if j not in self._dead and j not in self._finished_peers]

    def _count(self, **deltas) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    # ---------------------------------------------------------------- encoding

    def _encode(self, x: np.ndarray, distance: float | None, rng: np.random.Generator):
        """The model as it travels: a lattice code, or a full float32 copy."""
        if self.config.quant == "none" or distance is None or not distance > 0:
            return np.asarray(x, dtype=np.float32)
        t0 = time.perf_counter()
        side = lattice.side_for(distance, self.config.bits, margin=self.config.margin)
        code = lattice.encode(x, side, self.config.bits, rng)
        self._count(t_quantize=time.perf_counter() - t0)
        return code

    def _decode(self, model, reference: np.ndarray) -> np.ndarray | None:
        """The peer's model as float64, or None when a lattice code fails its check here."""
        if not isinstance(model, lattice.LatticeCode):
            return np.asarray(model, dtype=np.float64)
        t0 = time.perf_counter()
        out = lattice.decode(model, reference)
        self._count(t_decode=time.perf_counter() - t0)
        if out is None:
            self._count(decode_failures=1)
        return out

    # ---------------------------------------------------------------- initiator

    def _dealer(self, peer: int) -> zmq.Socket:
        sock = self._dealers.get(peer)
        if sock is None:
            sock = _peer_socket(self._ctx, zmq.DEALER, self._max_frame)
            # Queue nothing for a peer with no live connection: a send to a dead peer then
            # waits (bounded, on POLLOUT) instead of piling messages up for a ghost.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(self._addresses[peer])
            self._dealers[peer] = sock
        return sock

    def _drop_dealer(self, peer: int) -> None:
        # After a timeout: what is still queued for that peer must not arrive late.
        sock = self._dealers.pop(peer, None)
        if sock is not None:
            sock.close(linger=0)

    def _send(self, sock: zmq.Socket, msg: Message, deadline: float) -> bool:
        frames = to_frames(msg, job=self._job, world=self.world)
        wait_ms = max(0, int((deadline - time.monotonic()) * 1e3))
        if not sock.poll(wait_ms, zmq.POLLOUT):
            return False
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._count(messages_sent=1, bytes_sent=sum(len(f) for f in frames))
        return True

    def _recv(self, sock: zmq.Socket, peer: int, seq: int, deadline: float) -> Message | None:
        """The next valid message of interaction `seq` from `peer`, or None at the deadline."""
        while True:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1e3))
            if not sock.poll(wait_ms, zmq.POLLIN):
                return None
            frames = sock.recv_multipart(copy=True)
            self._count(messages_received=1, bytes_received=sum(len(f) for f in frames))
            try:
                msg = from_frames(frames, job=self._job, world=self.world, numel=self.numel)
            except WireError as exc:
                self._count(malformed=1)
                log.debug("rank %d: dropped a malformed reply: %s", self.rank, exc)
                continue
            if msg.sender != peer or msg.seq != seq or msg.kind in (Kind.EXCHANGE, Kind.RESEND):
                self._count(stale=1)
                continue
            return msg

    @property
    def pending(self) -> bool:
        """Whether an interaction this node started is still under way."""
        return self._pending is not None

    def interact(self, peer: int | None = None) -> str:
        """Average with one neighbour (drawn at random among the live ones if not given), blocking
        until it is over (at most about `timeout` per message of the exchange).

        Returns:
            "averaged", "declined" (the peer finished, or could not take it in time),
            "timeout" (no answer within `timeout`; see dead_after), or "no-peer" (none left).
        Must not be called with `lock` held, nor from two threads at once.
        """
        outcome = self.begin(peer)
        while outcome is None:
            outcome = self.poll(timeout=self.config.timeout)
        return outcome

    def begin(self, peer: int | None = None) -> str | None:
        """Start an interaction and return at once (the non-blocking variant): snapshot the model,
        send it. Local steps may go on meanwhile; `poll` applies the peer's answer as
        x <- x + (y^ - snapshot)/2, so they are kept on top of the average.

        Returns:
            None when the exchange is under way, else its outcome ("no-peer", "timeout").
        Raises:
            RuntimeError: an interaction is already under way (poll it to its end first).
        """
        if self._pending is not None:
            raise RuntimeError(f"rank {self.rank}: an interaction is already under way")
        t_start = time.perf_counter()
        try:
            return self._begin(peer)
        finally:
            self._count(t_interact=time.perf_counter() - t_start)

    def poll(self, timeout: float = 0.0) -> str | None:
        """Advance the interaction under way: handle what its peer sent, waiting up to `timeout`
        seconds for it.

        Returns:
            None while it is still under way (or when none is), else its outcome, as `interact`.
        """
        if self._pending is None:
            return None
        t_start = time.perf_counter()
        try:
            return self._poll(min(timeout, max(0.0, self._pending.deadline - time.monotonic())))
        finally:
            self._count(t_interact=time.perf_counter() - t_start)

    def _begin(self, peer: int | None) -> str | None:
        if peer is None:
            live = self.live_neighbours
            if not live:
                self._count(no_peer=1)
                return "no-peer"
            peer = int(live[self._rng.integers(len(live))])
        self._seq += 1
        with self.lock:
            x = np.asarray(self._read(), dtype=np.float64)
        payload = self._encode(x, self._distance, self._rng)
        if not isinstance(payload, lattice.LatticeCode) and self.config.quant == "lattice":
            self._count(bootstrap_full=1)
        pending = _Pending(peer=peer, seq=self._seq, x=x, sock=self._dealer(peer),
                           deadline=time.monotonic() + self.config.timeout,
                           ttl_ms=int(self.config.timeout * 1e3))
        if not self._send(pending.sock, Message(Kind.EXCHANGE, self.rank, pending.seq, model=payload,
                                                ttl_ms=pending.ttl_ms), pending.deadline):
            return self._timed_out(peer)
        self._pending = pending
        return None

    def _poll(self, wait: float) -> str | None:
        p = self._pending
        deadline = time.monotonic() + wait
        while True:
            msg = self._recv(p.sock, p.peer, p.seq, deadline)
            if msg is None:
                if time.monotonic() >= p.deadline:
                    self._pending = None
                    return self._timed_out(p.peer)
                return None
            outcome = self._handle_answer(p, msg)
            if outcome is not None:
                self._pending = None
                return outcome

    def _handle_answer(self, p: _Pending, msg: Message) -> str | None:
        """One answer of the peer: the outcome if it ends the interaction, else None."""
        if msg.kind == Kind.DECLINE:
            self._failures[p.peer] = 0
            self._count(declined=1)
            if msg.reason == Reason.FINISHED:
                self._finished_peers.add(p.peer)
                with self._stats_lock:
                    self.stats.finished_peers = sorted(self._finished_peers)
            return "declined"
        if msg.kind == Kind.NEED_FULL and not p.resent:
            p.resent = True
            self._count(fallbacks=1)
            p.deadline = time.monotonic() + self.config.timeout
            if not self._send(p.sock, Message(Kind.EXCHANGE, self.rank, p.seq,
                                              model=p.x.astype(np.float32), ttl_ms=p.ttl_ms), p.deadline):
                return self._timed_out(p.peer)
            return None
        if msg.kind != Kind.REPLY:
            self._count(stale=1)
            return None
        # Decoded against the snapshot, not the current model: j picked the code's side from
        # |x^ - y|, x^ being this snapshot as j decoded it, so y is within the code's radius of
        # it; the current model may be farther (the local steps taken since, or a third peer's
        # averaging), the more so the slower the interaction.
        y_hat = self._decode(msg.model, p.x)
        if y_hat is None:
            p.deadline = time.monotonic() + self.config.timeout
            if not self._send(p.sock, Message(Kind.RESEND, self.rank, p.seq), p.deadline):
                return self._timed_out(p.peer)
            return None
        with self.lock:
            self._add((y_hat - p.x) / 2)
        self._failures[p.peer] = 0
        distance = float(np.max(np.abs(y_hat - p.x))) if p.x.size else 0.0
        self._distance = distance
        self._count(interactions=1, t_latency=time.monotonic() - p.started)
        with self._stats_lock:
            self.stats.last_distance = distance
        return "averaged"

    def _timed_out(self, peer: int) -> str:
        self._count(timeouts=1)
        self._drop_dealer(peer)
        self._failures[peer] = self._failures.get(peer, 0) + 1
        if self._failures[peer] >= self.config.dead_after and peer not in self._dead:
            self._dead.add(peer)
            with self._stats_lock:
                self.stats.dead_peers = sorted(self._dead)
            log.warning("rank %d: peer %d did not answer %d times in a row (%.1f s each); "
                        "skipping it from now on", self.rank, peer, self._failures[peer],
                        self.config.timeout)
        return "timeout"

    # ---------------------------------------------------------------- responder

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(self.config.poll_ms):
                    continue
                frames = self._router.recv_multipart(copy=True)
                received = time.monotonic()
                self._count(messages_received=1, bytes_received=sum(len(f) for f in frames))
                if len(frames) < 2:
                    self._count(malformed=1)
                    continue
                identity, body = frames[0], frames[1:]
                try:
                    msg = from_frames(body, job=self._job, world=self.world, numel=self.numel)
                except WireError as exc:
                    self._count(malformed=1)
                    log.debug("rank %d: dropped a malformed request: %s", self.rank, exc)
                    continue
                if msg.kind == Kind.EXCHANGE:
                    self._answer_exchange(identity, msg, received)
                elif msg.kind == Kind.RESEND:
                    self._answer_resend(identity, msg)
                else:
                    self._count(stale=1)   # a reply kind on the request socket: not ours
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                self._count(errors=1)
                log.exception("rank %d: socket error in the answering thread", self.rank)
            except Exception:  # a bug must not take the worker's peers down with it
                self._count(errors=1)
                log.exception("rank %d: error in the answering thread", self.rank)

    def _reply(self, identity: bytes, msg: Message) -> None:
        frames = [identity, *to_frames(msg, job=self._job, world=self.world)]
        try:
            self._router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return   # the peer's queue is full: it will time out, as for a lost message
        self._count(messages_sent=1, bytes_sent=sum(len(f) for f in frames[1:]))

    def _answer_exchange(self, identity: bytes, msg: Message, received: float) -> None:
        if self._finished.is_set():
            self._reply(identity, Message(Kind.DECLINE, self.rank, msg.seq, reason=Reason.FINISHED))
            return
        # Half the initiator's patience for the lock: the reply must still reach it in time.
        budget = msg.ttl_ms / 2e3 - (time.monotonic() - received)
        self._peer_waiting.set()
        try:
            acquired = budget > 0 and self.lock.acquire(timeout=budget)
        finally:
            self._peer_waiting.clear()
        if not acquired:
            self._count(expired=1)
            self._reply(identity, Message(Kind.DECLINE, self.rank, msg.seq, reason=Reason.EXPIRED))
            return
        t0 = time.perf_counter()
        try:
            if self._finished.is_set():   # the trainer finished while we waited for the lock
                self._reply(identity, Message(Kind.DECLINE, self.rank, msg.seq,
                                              reason=Reason.FINISHED))
                return
            y = np.asarray(self._read(), dtype=np.float64)
            x_hat = self._decode(msg.model, y)
            if x_hat is None:
                self._reply(identity, Message(Kind.NEED_FULL, self.rank, msg.seq))
                return
            self._add((x_hat - y) / 2)
        finally:
            self.lock.release()
        distance = float(np.max(np.abs(x_hat - y))) if y.size else 0.0
        self._saved[msg.sender] = (msg.seq, y.astype(np.float32))
        reply = Message(Kind.REPLY, self.rank, msg.seq, model=self._encode(y, distance, self._serve_rng))
        self._count(served=1, t_serve=time.perf_counter() - t0)
        with self._stats_lock:
            self.stats.last_distance = distance
        self._reply(identity, reply)

    def _answer_resend(self, identity: bytes, msg: Message) -> None:
        saved = self._saved.get(msg.sender)
        if saved is None or saved[0] != msg.seq:
            self._count(stale=1)
            return
        self._count(fallbacks=1)
        self._reply(identity, Message(Kind.REPLY, self.rank, msg.seq, model=saved[1]))
