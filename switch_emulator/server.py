"""The switch's ZeroMQ front: one ROUTER socket, a thin loop, and the per-burst data path.

What it owns: the socket, the clock, the loss injectors' generator, the periodic work (liveness,
stats, releasing held-back packets once the queue is handled) and shutdown. What it must never
do: decide anything about jobs (that is `_jobs.ControlPlane`) or slots (the dataplane), or touch
packets one at a time in Python.

How it works: every message is `[identity, FRAME_DATA | FRAME_CONTROL, body]` (protocol.py), or a
split data message `[identity, FRAME_DATA, header words, payloads]` (switchagg.packet). The
loop polls for at most `POLL_MS`, then drains what is queued (at most `MAX_BATCH` messages before it
looks at the clock again); with loss injection it then delivers what the links held back. Control
frames go to the control plane and its replies are sent. A data frame is, per burst and never per
packet:
  1. admitted by the control plane for the job and rank THIS connection joined with (else at most
     one refusal per second to the sender);
  2. parsed without copying (`recv(copy=False)` then `parse_burst`, at the job's k and lane width:
     a frame that is not whole packets of that size counts as truncated) and validated against
     that job and rank: a spoofed rank, another job, a bad slot are dropped and counted by reason; the
     call check (`_callseq`) runs on both layouts' header words, and a mispaired call fails the
     job at once;
  3. passed through ingress loss injection if the job has it (the emulated link: it drops,
     holds back and duplicates packets before the dataplane checks them, malformed ones too; it
     takes split bursts alone, so an interleaved one is split first), then `dataplane.receive`
     once. A dataplane that offers `receive_checked` / `receive_split_checked` does steps 2 and 3
     in one call (the fast dataplane's compiled pass: one pass over the burst instead of a dozen
     numpy passes);
  4. its completed slots are sent to every receiving worker of the job, one send per worker of the
     same buffer without copying, and the retransmission answers to the sender alone. Split input
     is answered split (header frame, payload frame), from result buffers the dataplane reuses
     once ZeroMQ has sent them. With egress loss each worker gets what its link delivers (its own
     subset), in the layout that worker sends, and its small answers are gathered over up to
     `COALESCE_MESSAGES` handled messages into one burst (`_coalesce`: under loss most answers
     are a few packets, and each message costs tens of microseconds at both ends).
A member whose connection closes without LEAVE (a crashed or killed worker) is noticed at once:
ZeroMQ's monitor reports the disconnect, `_peerwatch` names the member, and a probe
`DISCONNECT_GRACE_S` later confirms it gone and aborts its job (freeing its name and slots), so a
job never outlives its processes; the liveness timeout stays the fallback (half-open TCP).
Sends use ROUTER_MANDATORY and never block: a vanished peer raises EHOSTUNREACH, which aborts its
job GONE_GRACE_S later unless its LEAVE arrives meanwhile (a worker that finished sends LEAVE and
closes; results still on their way to it must not abort the others' last call) or it reconnects
with its identity (a TCP reset; ROUTER_HANDOVER gives the identity to the new connection), so the others
learn why instead of waiting for the liveness timeout; a full queue drops the burst and counts it
(the worker's retransmission recovers, as after a loss). What is queued for each peer is bounded
in bytes (`_peerqueue`), split or interleaved results alike (every frame is sent tracked); a
peer that does not read loses results, then its job.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from switch_emulator._admission import Policy
from switch_emulator._callseq import Mispaired
from switch_emulator._coalesce import COALESCE_MESSAGES, COALESCE_PACKETS, ResultBatches
from switch_emulator._config import SwitchConfig
from switch_emulator._dataplane import SplitOutput
from switch_emulator._golden import DataplaneOutput
from switch_emulator._jobs import ControlPlane, Job, Reply
from switch_emulator._loss import LossInjector, LossRates
from switch_emulator._peerqueue import PeerQueues
from switch_emulator._peerwatch import PeerWatch
from switch_emulator._pipes import PipeSet
from switchagg.packet import (MAX_BURST_BYTES, Kind, join_split, packet_bytes, parse_burst,
                              parse_split, split_burst, validate_burst)
from switchagg.protocol import (FRAME_CONTROL, FRAME_DATA, Abort, HeartbeatAck, JoinOk,
                                encode_control)

__all__ = ["SwitchServer", "dataplane_factory", "POLL_MS"]

log = logging.getLogger("switch_emulator.server")

#: Longest the loop sleeps in poll: bounds how late a stop request or a liveness check is handled
#: (at most ~100 ms, so control messages never wait long).
POLL_MS = 100
#: Messages handled between two looks at the clock-driven work, so a flood cannot starve liveness.
MAX_BATCH = 256
#: Parts kept of one message; a valid one has 3 ([identity, type, body]), the rest is dropped.
MAX_FRAMES = 8
#: A peer that vanished is judged this long after a send found it gone: its LEAVE may still be
#: queued behind other messages, or (a TCP reset) it reconnects with its identity, which ZeroMQ
#: does within its 0.1 s reconnect interval; its job is aborted then unless it left gracefully or
#: was heard from since.
GONE_GRACE_S = 1.0
#: Liveness is checked this often (seconds); a silent worker is noticed within timeout + this.
LIVENESS_CHECK_S = 0.1


def dataplane_factory(name: str) -> Callable[..., object]:
    """`(world_size, slots, k, lane_bits=32) -> dataplane` for the dataplane called `name`
    ("fast" or "golden")."""
    from switch_emulator.dataplane import make_dataplane, warm_up

    make_dataplane(name, 1, 1, 8)  # fail now, with the valid names, not at the first JOIN
    # Compile (cold cache: seconds) or load (warm: well under one) compiled code now, before the
    # socket is bound, so that neither the first JOIN nor a liveness deadline waits for it.
    start = time.perf_counter()
    if warm_up(name):
        log.info("dataplane %s: compiled pass ready in %.2f s", name, time.perf_counter() - start)
    return lambda world_size, slots, k, lane_bits=32: make_dataplane(name, world_size, slots, k,
                                                                     lane_bits=lane_bits)


#: Send/receive flags as plain ints: pyzmq's flags are IntFlag members, and `IntFlag | int` builds
#: a new enum member (microseconds) on every part of every message.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def _send_data(sock: zmq.Socket, identity: bytes, *bodies: zmq.Frame | np.ndarray) -> None:
    """Send `[identity, FRAME_DATA, *bodies]` without blocking, the bodies without copying.

    One body is an interleaved burst, two are a split one (header words, payloads). What
    `send_multipart` does, less its per-call type checks and enum arithmetic. With
    ROUTER_MANDATORY an unknown peer fails on the first part, before anything is queued.

    Raises:
        zmq.ZMQError: EHOSTUNREACH (peer gone) or EAGAIN (its queue is full).
    """
    sock.send(identity, _NOBLOCK_MORE)
    sock.send(FRAME_DATA, _NOBLOCK_MORE)
    for body in bodies[:-1]:
        sock.send(body, _NOBLOCK_MORE, copy=False)
    sock.send(bodies[-1], _NOBLOCK, copy=False)


def _peer_address(frame: zmq.Frame) -> str | None:
    """The host a message came from (ZeroMQ's Peer-Address; None on ipc/inproc)."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None


def _loss_factory(config: SwitchConfig) -> Callable[[int], tuple[LossInjector | None, ...]] | None:
    if not config.loss_enabled:
        return None
    ingress = LossRates(config.drop_ingress, config.duplicate, config.reorder)
    egress = LossRates(config.drop_egress, config.duplicate, config.reorder)

    def make(job_id: int) -> tuple[LossInjector | None, LossInjector | None]:
        # One stream per (seed, job, direction): a job's losses do not depend on other jobs' traffic.
        return (LossInjector(ingress, np.random.default_rng([config.seed, job_id, 0])),
                LossInjector(egress, np.random.default_rng([config.seed, job_id, 1])))
    return make


class SwitchServer:
    """The switch process's loop around one ROUTER socket.

    Args:
        config: validated settings.
        context: a ZeroMQ context to use (default: a private one, terminated by `close`).
        clock: seconds, monotonic (injectable for tests).

    Use `bind()` then `run(stop)`; `run` returns 0 after a clean shutdown.
    """

    def __init__(self, config: SwitchConfig, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._own_context = context is None
        self.context = context or zmq.Context()
        policy = Policy(config.token, config.join_timeout, config.max_job_slots,
                        config.max_peer_slots, config.max_peer_jobs)
        self.control = ControlPlane(config.slots, config.heartbeat_interval,
                                    config.liveness_timeout, dataplane_factory(config.dataplane),
                                    _loss_factory(config), policy=policy,
                                    lane_bits=config.lane_bits)
        self._lossy = config.loss_enabled  # jobs get loss injectors, whose held packets we release
        self.queues = PeerQueues(config.peer_queue_bytes)
        self.batches = ResultBatches()  # a lossy job's results, gathered per worker (`_coalesce`)
        self._now = clock()
        # Peers a send found gone, and when: judged GONE_GRACE_S later, so that a LEAVE they
        # sent just before closing (still in our inbound queue) is read first.
        self._gone: dict[bytes, float] = {}
        self.socket: zmq.Socket | None = None
        self.watch: PeerWatch | None = None  # members' disconnects (`_peerwatch`)
        self.endpoint = ""
        self.pipes: PipeSet | None = None  # `--pipes P > 1`: the dataplane processes

    def bind(self) -> str:
        """Create and bind the ROUTER; return the bound endpoint (a tcp port of 0 or * is resolved).

        Raises:
            zmq.ZMQError: the endpoint cannot be bound (in use, bad interface).
        """
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A worker that reconnects (a TCP reset) comes back with its identity: the new
        # connection takes the identity over, so the switch still knows its rank.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # No valid frame is larger than a burst: libzmq drops a peer that announces more before
        # buffering it (a 4 GiB frame would otherwise be 4 GiB of this process).
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_BURST_BYTES)
        sock.setsockopt(zmq.LINGER, int(self.config.linger * 1000))
        if self.config.curve_secret_file:
            from switch_emulator._keys import server_options
            try:
                server_options(sock, self.config.curve_secret_file)
            except (ValueError, RuntimeError):
                sock.close(linger=0)
                raise
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.watch = PeerWatch(sock)
        if self.config.pipes > 1:
            try:
                self.pipes = PipeSet(self.config.pipes, self.config.bind, self.config.hwm,
                                     self.context, self.config.peer_queue_bytes,
                                     self.config.liveness_timeout, self.config.curve_secret_file)
            except BaseException:
                self.watch.close()
                sock.close(linger=0)
                raise
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("switch listening on %s (%d slots, dataplane %s, liveness %.3g s)", self.endpoint,
                 self.config.slots, self.config.dataplane, self.config.liveness_timeout)
        return self.endpoint

    def run(self, stop: threading.Event) -> int:
        """Serve until `stop` is set; then ABORT every job, log the counters, close. Returns 0."""
        if self.socket is None:
            self.bind()
        sock = self.socket
        poller = zmq.Poller()  # one for the whole run: Socket.poll builds one per call
        poller.register(sock, zmq.POLLIN)
        now = self.clock()
        next_liveness = now + LIVENESS_CHECK_S
        interval = self.config.stats_interval
        next_stats = now + interval if interval else float("inf")
        try:
            while not stop.is_set():
                if poller.poll(POLL_MS):
                    self._drain(sock, poller.poll)
                if self._lossy:
                    # What the links held back arrives once the queued traffic is handled (the
                    # rest of its burst went first). Waiting for a quiet POLL_MS instead held a
                    # call's last resends 100 ms: longer than the RTO (issue 15's tail calls).
                    self._release_held()
                now = self.clock()
                if now >= next_liveness:
                    self._send_replies(self.control.check_liveness(now))
                    self._judge_gone(now)
                    self._judge_disconnects(now)
                    self._prune_queues()
                    next_liveness = now + LIVENESS_CHECK_S
                    if self.pipes is not None:
                        if not self.pipes.alive():
                            raise RuntimeError("a dataplane pipe process died")
                        self._pipe_reports()
                        self.pipes.sync(self.control.jobs)
                if now >= next_stats:
                    self._log_stats()
                    next_stats = now + interval
        finally:
            self.close()
        return 0

    def _drain(self, sock: zmq.Socket, poll: Callable[[int], list]) -> None:
        """Handle up to `MAX_BATCH` queued messages without waiting (`poll`: the run's poller).

        Per message this is what `recv_multipart` does, less its costs: a part's `more` flag
        replaces a `getsockopt(RCVMORE)` (microseconds: it converts the option to an enum), and a
        zero-timeout poll ends the batch where a failed recv would raise (several times dearer).
        """
        recv, dispatch, clock = sock.recv, self._dispatch, self.clock
        try:
            for handled in range(1, MAX_BATCH + 1):
                if not self._handle_one(recv, dispatch, clock) or not poll(0):
                    return
                if handled % COALESCE_MESSAGES == 0 and self.batches:
                    self._flush_batches()
        finally:
            if self.batches:
                self._flush_batches()

    def _handle_one(self, recv, dispatch, clock) -> bool:
        """Receive and dispatch one message; False if none was queued after all."""
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:  # polled readable, yet nothing: never seen, but never wait here
            return False
        frames = [frame]
        while frame.more and len(frames) <= MAX_FRAMES:  # parts of a message come together
            frame = recv(_NOBLOCK, copy=False)
            frames.append(frame)
        while frame.more:  # a message of absurdly many parts: drain and drop the rest
            frame = recv(_NOBLOCK, copy=False)
        try:
            dispatch(frames, clock())
        except Exception:  # noqa: BLE001 - a bug, not the peer's fault: no job may die of it
            self.control.counters["internal_errors"] = (
                self.control.counters.get("internal_errors", 0) + 1)
            log.exception("message from %s could not be handled; dropped",
                          frames[0].bytes.hex())
        return True

    def close(self) -> None:
        """ABORT every job ("switch shutting down"), log the counters, close the socket."""
        if self.socket is None:
            return
        self.batches.clear()  # every job is being aborted: their pending results are moot
        self._send_replies(self.control.shutdown("switch shutting down"))
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.pipes is not None:
            self.pipes.close()
            self.pipes = None
        self._log_stats()
        self.socket.close(linger=int(self.config.linger * 1000))
        self.socket = None
        if self._own_context:
            self.context.term()
        log.info("switch stopped")

    # ------------------------------------------------------------------------------- dispatch

    def _dispatch(self, frames: list[zmq.Frame], now: float) -> None:
        self._now = now
        identity = frames[0].bytes
        if len(frames) == 4 and frames[1].bytes == FRAME_DATA:  # a split burst
            self._on_split(identity, frames[2], frames[3], now)
            return
        if len(frames) != 3:
            self.control.count_malformed("frames")
            self._send_replies(self.control.refuse(
                identity, now, "malformed", f"expected 2 frames [type, body], got "
                f"{len(frames) - 1}", "frames"))
            return
        kind = frames[1].bytes
        if kind == FRAME_DATA:
            self._on_data(identity, frames[2], now)
        elif kind == FRAME_CONTROL:
            self._send_replies(self.control.on_control(identity, frames[2].buffer, now,
                                                       _peer_address(frames[0])))
            if identity in self.control.members:  # its heartbeats keep the descriptor current
                self.watch.seen(identity, frames[0])
        else:
            self.control.count_malformed("frame_type")
            self._send_replies(self.control.refuse(
                identity, now, "malformed", f"first frame must be {FRAME_DATA!r} or "
                f"{FRAME_CONTROL!r}, got {kind[:8]!r}", "frames"))

    def _admit(self, identity: bytes, now: float) -> tuple[Job, int] | None:
        """(job, rank) of a data message's sender, counting the burst; None (answered) if refused."""
        admitted = self.control.admit_data(identity, now)
        if admitted.job is None:
            self._send_replies(admitted.replies)
            return None
        admitted.job.counters.bursts_in += 1
        return admitted.job, admitted.rank

    def _on_data(self, identity: bytes, frame: zmq.Frame, now: float) -> None:
        admitted = self._admit(identity, now)
        if admitted is None:
            return
        job, rank = admitted
        job.members[rank].interleaved = True
        counters = job.counters
        buffer = frame.buffer
        # A worker's burst never exceeds its job's slots: a larger frame is garbage, and would
        # only grow what the switch queues for the job's receivers.
        if buffer.nbytes > min(MAX_BURST_BYTES, job.slots * packet_bytes(job.k, job.lane_bits)):
            counters.count_malformed({"oversized": 1})
            return
        packets, trailing = parse_burst(buffer, job.k, job.lane_bits)
        counters.packets_in += len(packets)
        if trailing:
            counters.count_malformed({"truncated": 1})
        mispaired = job.calls.check(packets, job.job_id, rank)
        if mispaired is not None:  # ranks' calls drifted apart: wrong sums if we went on
            self._send_replies(self.control.mispaired(job, mispaired))
            return
        if job.ingress is not None:  # the link loses split bursts alone: one layout per flow
            self._lose_and_deliver(job, rank, identity, *split_burst(packets))
            return
        fused = getattr(job.dataplane, "receive_checked", None)
        if fused is not None:
            # The common case: checks, aggregation and results in one compiled pass.
            out, bad = fused(packets, rank, job.job_id)
            if bad:
                counters.count_malformed(bad)
            self._send_output(job, rank, identity, out)
            return
        self._check_and_deliver(job, rank, identity, packets)

    def _on_split(self, identity: bytes, heads_frame: zmq.Frame, vals_frame: zmq.Frame,
                  now: float) -> None:
        """A split data message: the same steps as `_on_data`; answered split by the compiled
        pass, else joined into one burst (a copy) for the paths that take only that."""
        admitted = self._admit(identity, now)
        if admitted is None:
            return
        job, rank = admitted
        job.members[rank].interleaved = False
        counters = job.counters
        hb, vb = heads_frame.buffer, vals_frame.buffer
        # As in `_on_data`: never more than the job's slots, whatever the layout.
        if hb.nbytes + vb.nbytes > min(MAX_BURST_BYTES,
                                       job.slots * packet_bytes(job.k, job.lane_bits)):
            counters.count_malformed({"oversized": 1})
            return
        heads, vals, truncated = parse_split(hb, vb, job.k, job.lane_bits)
        if truncated:
            counters.packets_in += 1
            counters.count_malformed({"truncated": 1})
            return
        counters.packets_in += len(heads)
        mispaired = job.calls.check_split(heads, job.job_id, rank)
        if mispaired is not None:  # ranks' calls drifted apart: wrong sums if we went on
            self._send_replies(self.control.mispaired(job, mispaired))
            return
        if job.ingress is not None:
            self._lose_and_deliver(job, rank, identity, heads, vals)
            return
        self._deliver_split(job, rank, identity, heads, vals)

    def _lose_and_deliver(self, job: Job, rank: int, identity: bytes, heads: np.ndarray,
                          vals: np.ndarray) -> None:
        """Ingress loss, then the dataplane: the link drops, holds back and duplicates packets
        before the dataplane checks them (malformed ones too), as a wire would."""
        heads, vals = job.ingress.apply((heads, vals), rank)
        if len(heads):
            self._deliver_split(job, rank, identity, heads, vals)

    def _deliver_split(self, job: Job, rank: int, identity: bytes, heads: np.ndarray,
                       vals: np.ndarray) -> None:
        """Checks, aggregation and results of a split burst: the compiled pass if the dataplane
        has it, else the per-packet path on the joined burst (a copy)."""
        fused = getattr(job.dataplane, "receive_split_checked", None)
        if fused is not None:
            out, bad = fused(heads, vals, rank, job.job_id)
            if bad:
                job.counters.count_malformed(bad)
            self._send_output(job, rank, identity, out)
            return
        self._check_and_deliver(job, rank, identity, join_split(heads, vals, job.k))

    def _check_and_deliver(self, job: Job, rank: int, identity: bytes,
                           packets: np.ndarray) -> None:
        """The per-packet path (a dataplane without the fused pass): validate, then deliver."""
        ok, bad = validate_burst(packets, kind=Kind.DATA, job=job.job_id, worker=rank,
                                 slots=job.slots)
        if bad:
            job.counters.count_malformed(bad)
            packets = packets[ok]
        self._deliver(job, rank, identity, packets)

    def _deliver(self, job: Job, rank: int, identity: bytes, packets: np.ndarray) -> None:
        if len(packets):
            self._send_output(job, rank, identity, job.dataplane.receive(packets, rank))

    def _send_output(self, job: Job, rank: int, identity: bytes,
                     out: DataplaneOutput | SplitOutput) -> None:
        """Multicast the completed slots to the job's receivers; unicast the shadow copies."""
        if isinstance(out, SplitOutput):
            self._send_split(job, rank, identity, out)
            return
        if job.egress is not None:  # the link loses split bursts alone: one layout per flow
            self._send_split(job, rank, identity,
                             SplitOutput(*split_burst(out.multicast), *split_burst(out.unicast)))
            return
        if len(out.multicast):
            # One zero-copy frame for every receiver (libzmq refcounts it): a frame per send costs
            # about 15 us more each.
            shared = zmq.Frame(out.multicast, copy=False, track=True)
            for member in job.receivers():
                self._send_tracked(job, member.rank, member.identity, out.multicast, shared)
                if job.job_id not in self.control.jobs:  # a peer was gone: the job is aborted
                    return
        if len(out.unicast):
            self._send_tracked(job, rank, identity, out.unicast)

    def _send_split(self, job: Job, rank: int, identity: bytes, out: SplitOutput) -> None:
        """`_send_output` for split results: [header words, payloads] frames, never joined.

        Without egress loss one pair of zero-copy frames serves every receiver; with it, each
        receiver gets what its link delivers (its own subset, or the same buffers when its link
        lost nothing of them).
        """
        if len(out.mc_heads):
            # One pair of zero-copy, tracked frames for every receiver (libzmq refcounts them);
            # the pooled buffers come back once every copy is out (`_buffers`).
            shared = (None if job.egress is not None else
                      (zmq.Frame(out.mc_heads, copy=False, track=True),
                       zmq.Frame(out.mc_vals, copy=False, track=True)))
            for member in job.receivers():
                self._send_split_to(job, member.rank, member.identity, out.mc_heads,
                                    out.mc_vals, shared)
                if job.job_id not in self.control.jobs:  # a peer was gone: the job is aborted
                    return
        if len(out.uc_heads):
            self._send_split_to(job, rank, identity, out.uc_heads, out.uc_vals)

    def _send_split_to(self, job: Job, rank: int, identity: bytes, heads: np.ndarray,
                       vals: np.ndarray,
                       shared: tuple[zmq.Frame, zmq.Frame] | None = None) -> None:
        """Results for one worker, through its egress link if it has one (`shared`: the same
        arrays already wrapped, for a lossless multicast)."""
        if job.egress is not None:
            heads, vals = job.egress.apply((heads, vals), rank)
            if not len(heads):
                return
        if shared is not None:
            self._send_split_tracked(job, rank, identity, shared, len(heads))
        else:
            self._send_lost_results(job, rank, identity, heads, vals)

    def _send_lost_results(self, job: Job, rank: int, identity: bytes, heads: np.ndarray,
                           vals: np.ndarray) -> None:
        """What a lossy link delivers to one worker: gathered with its other pending results
        (`_coalesce`), sent when the batch is full or the loop flushes."""
        if len(heads) >= COALESCE_PACKETS // 2:  # large already: at once, and never copied again
            self._send_batch(job, rank, identity, heads, vals)
        elif self.batches.add(identity, job, rank, heads, vals):
            self._flush_batch(identity)

    def _flush_batches(self) -> None:
        for identity in self.batches.identities():
            try:
                self._flush_batch(identity)
            except Exception:  # noqa: BLE001 - a bug: these results are lost, no job dies of it
                self.batches.pop(identity)
                self.control.counters["internal_errors"] = (
                    self.control.counters.get("internal_errors", 0) + 1)
                log.exception("results for %s could not be sent; dropped", identity.hex())

    def _flush_batch(self, identity: bytes) -> None:
        """Send one peer's pending results as one burst, in the layout that peer sends (the
        link handles split bursts alone; a peer that speaks interleaved bursts gets them back),
        unless its job ended or it left meanwhile."""
        batch = self.batches.pop(identity)
        if batch is not None:
            self._send_batch(batch.job, batch.rank, identity, *batch.joined())

    def _send_batch(self, job: Job, rank: int, identity: bytes, heads: np.ndarray,
                    vals: np.ndarray) -> None:
        """Send a lossy job's results to one member now, if it is still one."""
        if self.control.jobs.get(job.job_id) is not job:  # the job ended meanwhile
            return
        member = job.members.get(rank)
        if member is None or member.departed or member.identity != identity:
            return
        if member.interleaved:
            self._send_tracked(job, rank, identity, join_split(heads, vals, job.k))
            return
        self._send_split_tracked(job, rank, identity,
                                 (zmq.Frame(heads, copy=False, track=True),
                                  zmq.Frame(vals, copy=False, track=True)), len(heads))

    def _send_split_tracked(self, job: Job, rank: int, identity: bytes,
                            frames: tuple[zmq.Frame, zmq.Frame], n: int) -> None:
        """`_send_tracked` for a split burst's two frames: the same byte budget and abort."""
        nbytes = len(frames[0].buffer) + len(frames[1].buffer)
        if not self._within_budget(job, rank, identity, nbytes):
            return
        try:
            _send_data(self.socket, identity, *frames)
        except zmq.ZMQError as exc:
            job.counters.send_failures += 1
            self._send_failed(identity, exc)
            return
        for frame in frames:
            self.queues.sent(identity, frame.tracker, len(frame.buffer))
        job.counters.bursts_out += 1
        job.counters.packets_out += n

    def _send_tracked(self, job: Job, rank: int, identity: bytes, results: np.ndarray,
                      frame: zmq.Frame | None = None) -> None:
        """Send within the peer's byte budget (`_peerqueue`); a peer over it for the liveness
        timeout does not read, and its job is aborted."""
        nbytes = results.nbytes
        if not self._within_budget(job, rank, identity, nbytes):
            return
        if frame is None:
            frame = zmq.Frame(results, copy=False, track=True)
        try:
            _send_data(self.socket, identity, frame)
        except zmq.ZMQError as exc:
            job.counters.send_failures += 1
            self._send_failed(identity, exc)
            return
        self.queues.sent(identity, frame.tracker, nbytes)
        job.counters.bursts_out += 1
        job.counters.packets_out += len(results)

    def _within_budget(self, job: Job, rank: int, identity: bytes, nbytes: int) -> bool:
        """May `nbytes` more go to `identity`? If not, count the refusal, and abort the job of
        a peer over its budget for the liveness timeout (it does not read)."""
        if self.queues.admit(identity, nbytes, self._now):
            return True
        job.counters.results_refused += 1
        since = self.queues.over_since(identity)
        if since is not None and self._now - since > self.config.liveness_timeout:
            queued = self.queues.queued(identity)
            self._send_replies(self.control.abort(
                job, f"rank {rank} of job {job.name!r} has not read its results for "
                f"{self._now - since:.1f} s ({queued / 2**20:.1f} MiB queued, the most one "
                f"peer may hold: --peer-queue-bytes {self.queues.budget})", rank))
        return False

    def _pipe_reports(self) -> None:
        """Abort the jobs whose calls a pipe found mispaired (as `_on_data` does for its own),
        or with a member that has not read its results there (as `_within_budget` does)."""
        for report in self.pipes.reports():
            job = self.control.jobs.get(report.get("job_id"))
            if job is None:
                continue
            if report["op"] == "not_reading":
                rank = report.get("rank")
                try:
                    seconds, queued = float(report["seconds"]), int(report["queued"])
                except (KeyError, TypeError, ValueError):
                    continue
                self._send_replies(self.control.abort(
                    job, f"rank {rank} of job {job.name!r} has not read its results from a "
                    f"dataplane pipe for {seconds:.1f} s ({queued / 2**20:.1f} MiB queued, the "
                    f"most one peer may hold: --peer-queue-bytes {self.queues.budget})",
                    rank if isinstance(rank, int) else None))
                continue
            try:
                found = Mispaired(*(int(report[name]) for name in Mispaired._fields))
            except (KeyError, TypeError, ValueError):
                continue
            self._send_replies(self.control.mispaired(job, found))

    def _judge_gone(self, now: float) -> None:
        """Abort the jobs of peers found gone GONE_GRACE_S ago that did not LEAVE (or come back)
        meanwhile."""
        for identity, since in list(self._gone.items()):
            if now - since >= GONE_GRACE_S:
                del self._gone[identity]
                found = self.control.members.get(identity)
                if found is not None and found[1].last_seen > since:
                    continue  # it reconnected (same identity) and spoke since
                self._send_replies(self.control.peer_gone(identity))

    def _judge_disconnects(self, now: float) -> None:
        """Abort the jobs of members ZeroMQ saw disconnect `DISCONNECT_GRACE_S` ago that are
        still gone: a HEARTBEAT_ACK (harmless to a worker) finds no connection for them."""
        watch = self.watch
        watch.drain(now)
        for identity in watch.due(now):
            found = self.control.members.get(identity)
            if found is None or found[1].departed:  # it left (or its job ended): all is well
                watch.forget(identity)
                continue
            probe = encode_control(HeartbeatAck(found[0].job_id, self.control.incarnation))
            try:
                self.socket.send_multipart([identity, FRAME_CONTROL, probe], _NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == errno.EHOSTUNREACH:
                    watch.forget(identity)
                    self._gone.pop(identity, None)
                    log.info("peer %s disconnected without LEAVE", identity.hex())
                    self._send_replies(self.control.peer_gone(identity))
                    continue
                # EAGAIN: its queue is full, so a connection holds it
            watch.cleared(identity)

    def _prune_queues(self) -> None:
        """Forget the byte accounts of peers no longer in a job whose frames are all out, and
        stop watching them for disconnects."""
        members = self.control.members
        for identity in self.queues.idle_strangers(members):
            self.queues.forget(identity)
        for identity in self.watch.watched():
            if identity not in members:
                self.watch.forget(identity)

    def _release_held(self) -> None:
        """What was queued is handled: deliver the packets the loss injectors held back
        (reordering), then the results gathered meanwhile."""
        self._now = self.clock()
        try:
            self._release_held_packets()
        finally:
            if self.batches:
                self._flush_batches()

    def _release_held_packets(self) -> None:
        for job in list(self.control.jobs.values()):
            for inj, ingress in ((job.ingress, True), (job.egress, False)):
                if inj is None or not inj.holding:
                    continue
                for rank in inj.held_flows():
                    held = inj.release(rank)
                    member = job.members.get(rank)
                    if held is None or member is None or member.departed:
                        continue
                    heads, vals = held  # both links hold split bursts alone
                    if ingress:
                        self._deliver_split(job, rank, member.identity, heads, vals)
                    else:
                        self._send_lost_results(job, rank, member.identity, heads, vals)
                    if job.job_id not in self.control.jobs:  # a send found a peer gone
                        break

    # ------------------------------------------------------------------------------- control out

    def _send_replies(self, replies: list[Reply]) -> None:
        encoded: dict[int, bytes] = {}  # one READY/ABORT object goes to many workers
        gone: list[bytes] = []
        for identity, message in replies:
            if self.pipes is not None:
                message = self._with_pipes(message)
            body = encoded.get(id(message))
            if body is None:
                body = encoded[id(message)] = encode_control(message)
            try:
                self.socket.send_multipart([identity, FRAME_CONTROL, body], _NOBLOCK)
            except zmq.ZMQError as exc:
                self.control.counters["send_failures"] += 1
                # An ABORT to a peer that is gone needs no further action.
                if exc.errno == errno.EHOSTUNREACH and not isinstance(message, Abort):
                    gone.append(identity)
        for identity in gone:
            self._gone.setdefault(identity, self._now)

    def _with_pipes(self, message):
        """Tell the pipes what the control plane decided: a JOIN_OK admits the worker there too
        (and names the pipes to it), an ABORT drops the job there."""
        if isinstance(message, JoinOk):
            key = self.pipes.admit(message.job_id, message.rank, message.world_size, message.k,
                                   message.slots, message.lane_bits)
            return dataclasses.replace(message, pipes=tuple(self.pipes.endpoints), pipe_key=key)
        if isinstance(message, Abort):
            self.pipes.drop(message.job_id)
        return message

    def _send_failed(self, identity: bytes, exc: zmq.ZMQError) -> None:
        self.control.counters["send_failures"] += 1
        if exc.errno == errno.EHOSTUNREACH:
            if identity not in self._gone:
                log.info("peer %s is gone", identity.hex())
            self._gone.setdefault(identity, self._now)
        else:
            log.debug("send to %s failed: %s", identity.hex(), exc)

    def _log_stats(self) -> None:
        stats = self.control.stats()
        jobs = stats.pop("jobs")
        log.info("switch counters: %s", json.dumps(stats, sort_keys=True))
        for job in jobs.values():
            log.info("job %s counters: %s", job["name"], json.dumps(job, sort_keys=True))
