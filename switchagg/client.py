"""The worker's switch client: `SwitchClient`, a ZeroMQ engine thread around the sans-IO stream.

What it owns: one connection to the switch for one job: JOIN and READY, data
bursts out and results in, heartbeats, liveness, abort, and the typed errors a user sees. What it
must never do: decide protocol rules (that is `switchagg._stream`, which it drives), touch its
socket from more than one thread, or wait without a bound.

How it works: the constructor starts one engine thread that owns the DEALER socket. User threads
never touch that socket: a call puts a request on a FIFO queue and wakes the engine through an
inproc PAIR socket (guarded by a lock: several user threads may call at once). The engine polls
both sockets with a timeout set by the next timer (retransmission, heartbeat, liveness, progress),
feeds data frames to the `StreamMachine`, sends what it returns (split messages: header words from
its ring and payloads straight from the caller's array, both zero-copy, which the protocol proves
unchanged until the switch has them), and completes `concurrent.futures.Future`s. The
blocking calls are the async ones plus a bounded wait.

Failure handling, all ending in a `SwitchError` on every pending and later call:
- ABORT from the switch (a worker died or left): `JobAborted` naming the worker and why.
- Silence (no result, no HEARTBEAT_ACK) for the switch's liveness_timeout while work is pending:
  `SwitchTimeout` (the switch is gone).
- No progress for `ClientConfig.op_timeout`: one QUERY asks the switch which workers it misses on
  the stuck slots; `SwitchTimeout` names them. The client then LEAVEs with a reason so the job is
  aborted for the others too instead of leaving them to time out.
- A restarted switch: JOIN_OK and every HEARTBEAT_ACK carry the switch's incarnation (a random id
  per run); another one, or an ERROR saying this connection is in no job (not_joined,
  wrong_member, departed), means the switch lost the job: `JobAborted` at once, within one
  heartbeat interval, saying the switch restarted and the job must be restarted.
- Mispaired calls: each call has a sequence number (the n-th call, or `call=` given by the
  caller) that rides in every packet; the switch aborts the job when two ranks' calls meet on a
  slot, and the ABORT names both numbers.
- The engine thread dies of an unexpected exception: every pending and later call fails with a
  `SwitchError` whose `__cause__` is that exception.

Lanes: the job's lane width (`lane_bits`, 8, 16 or 32; JOIN_OK says which) is what the packets
carry; `allreduce` checks and packs its int32 input to it in the caller's thread (a value that
does not fit raises ValueError at once) and the stream machine sign-extends the sums back.

Closing: `close()` (or leaving the `with` block) sends LEAVE and waits, bounded, for it to go out,
so the job ends as soon as its last worker closed. A client the program never closes LEAVEs at
interpreter exit (an atexit handler, `EXIT_LEAVE_S` in all; a reason naming the uncaught
exception, if one ended the program); a process killed outright is dropped by the switch when its
connection closes. Either way the job's name is free again for the next run.

The routing identity is set once (random, or `identity=`), so a reconnect after a TCP reset
comes back as the same connection and the switch (ROUTER_HANDOVER) still knows its rank; a JOIN
sent again names the rank the switch granted.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import zmq

from switchagg._curve import client_options, load_public
from switchagg._limits import check_endpoint
from switchagg._pipe_links import PipeLinks
from switchagg._stream import (JIT_MIN_ELEMENTS, FillFn, StreamCall, StreamMachine, array_fill,
                               load_kernels, pack_lanes)
from switchagg.errors import (
    ConfigError, JobAborted, JoinRejected, ProtocolError, SwitchError, SwitchTimeout,
)
from switchagg.packet import (DEFAULT_K, MAX_BURST_BYTES, MAX_SLOTS, VALID_K, check_lane_bits,
                              packet_bytes)
from switchagg.protocol import (
    FRAME_CONTROL, MAX_NAME_LEN, MAX_REPLY_BYTES, FRAME_DATA, Abort, ControlMessage, Error, Heartbeat, HeartbeatAck, Join,
    JoinOk, Leave, Query, QueryReply, Ready, StatsReply, StatsRequest, decode_control,
    encode_control,
)

__all__ = ["ClientConfig", "ClientStats", "SwitchClient"]

log = logging.getLogger(__name__)

_CLIENT_IDS = itertools.count()
#: How long a blocking call sleeps between checks that the engine thread is still alive.
_WAIT_SLICE = 1.0
#: At most this many stuck slots are named in a QUERY (and in the error message).
_QUERY_SLOTS = 16
#: Messages drained from the data socket per loop turn, so timers and requests still get a turn.
_DRAIN = 64
#: At interpreter exit, the longest all open clients together wait for their LEAVE to go out.
EXIT_LEAVE_S = 2.0
#: ERROR codes by which the switch says this connection is not (or no longer) in its job: pending
#: calls can never complete (switch_emulator._jobs.ErrorCode.MEMBERSHIP_LOST).
_MEMBERSHIP_LOST = frozenset({"not_joined", "wrong_member", "departed"})
# Plain ints: pyzmq's flag enums cost an interpreted enum operation on every `|` and call, and the
# engine makes several such calls per burst.
_NOBLOCK, _SNDMORE, _EVENTS, _POLLIN = (int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.EVENTS),
                                        int(zmq.POLLIN))


@dataclass(frozen=True)
class ClientConfig:
    """How a worker talks to the switch. Every default lives here; `validate()` checks them all.

    Attributes:
        k: lanes (values) per packet; one of packet.VALID_K. Default 64 (256 B of int32 lanes, a
            Tofino's packet; 64 B of 8-bit lanes).
            Fixed per job: every worker must agree. Example: `ClientConfig(k=256)`.
        slots: slot pool size s asked for at JOIN, <= packet.MAX_SLOTS; the switch may grant fewer
            (JOIN_OK says). At most `window` (<= s) chunks are in flight. Default 8192 (as on a
            Tofino). Example: `slots=2048` for a small test job.
        window: chunks in flight at most, in [burst, slots]. Default None: half the granted
            slots where that holds at least two bursts, else all of them. The other half is
            slack for loss: a lost chunk's slot stays taken until its resend is answered, and
            with every slot in flight the next first send into it waits (switchagg/_stream.py;
            at 1% loss about 10% more throughput, none lost without loss, the README's
            benchmarks). Example: `window=8192` with `slots=16384`.
        burst: packets per ZeroMQ data frame, <= slots (cut to the granted slots). Default 1024
            (about 272 KiB at k=64: large frames amortize ZeroMQ's ~80 us per message,
            the README's benchmarks). Example: `burst=4096`.
        join_timeout: seconds to wait for JOIN_OK, and again for READY (every worker joined).
            Default 30. Example: `join_timeout=5` in tests.
        op_timeout: seconds an all-reduce may go without any result before it fails with
            SwitchTimeout naming the stuck slots and missing workers. Default 60 (a slow peer
            still computing its gradient is not an error). Example: `op_timeout=10`.
        query_timeout: seconds to wait for the switch's answer to that QUERY. Default 1.
        rto_initial: retransmission timeout before the first RTT sample, seconds. Default 0.2.
        rto_min: lower bound of the retransmission timeout, seconds, and the longest a packet is
            assumed held in the network: a resent chunk's slot is not reused sooner, and it is
            the least reordering window once reordering was seen (and always for resent
            chunks; without reordering the window is a quarter of the min RTT, switchagg/
            _stream.py). Default 0.01: the emulator's round trip is 1-30 ms for a burst,
            10^2-10^3 x a Tofino's; at 0.05 every loss cost at least 50 ms (issue 15: 0.06x the
            lossless throughput at 1% loss). Example: `rto_min=0.02`.
        rto_max: upper bound of the (exponentially backed-off) timeout, seconds. Default 2.
        leave_linger: seconds close() lets the LEAVE message flush before dropping it. Default 1.
    """

    k: int = DEFAULT_K
    slots: int = 8192
    burst: int = 1024
    window: int | None = None
    join_timeout: float = 30.0
    op_timeout: float = 60.0
    query_timeout: float = 1.0
    rto_initial: float = 0.2
    rto_min: float = 0.01
    rto_max: float = 2.0
    leave_linger: float = 1.0

    def validate(self) -> ClientConfig:
        """Check every field; returns self.

        Raises:
            ConfigError: naming the field and its value (a ValueError).
        """
        def bad(name: str, why: str) -> ConfigError:
            value = getattr(self, name)
            return ConfigError(f"ClientConfig.{name}={value!r}: {why}", field=name, value=value)

        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(f.name, "expected an int")
            if f.type == "float" and (not isinstance(value, (int, float)) or value <= 0):
                raise bad(f.name, "expected a positive number of seconds")
        if self.k not in VALID_K:
            raise bad("k", f"choose one of {VALID_K}")
        if not 1 <= self.slots <= MAX_SLOTS:
            raise bad("slots", f"must be in [1, {MAX_SLOTS}]")
        if not 1 <= self.burst <= self.slots:
            raise bad("burst", f"must be in [1, slots={self.slots}]")
        if self.burst * packet_bytes(self.k) > MAX_BURST_BYTES:
            raise bad("burst", f"{self.burst} packets of k={self.k} exceed the switch's "
                               f"{MAX_BURST_BYTES} byte frame limit")
        if not self.rto_min <= self.rto_max:
            raise bad("rto_min", f"must not exceed rto_max={self.rto_max}")
        if self.window is not None and (not isinstance(self.window, int)
                                        or isinstance(self.window, bool)
                                        or not self.burst <= self.window <= self.slots):
            raise bad("window", f"must be an int in [burst={self.burst}, slots={self.slots}]")
        return self

    def window_for(self, slots: int, burst: int) -> int:
        """The window for a job granted `slots` with bursts of `burst` (`window` cut to them)."""
        if self.window is not None:
            return max(burst, min(self.window, slots))
        return slots // 2 if slots // 2 >= 2 * burst else slots


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of one client's counters (see `switchagg._stream.StreamCounters` for data ones).

    Attributes beyond the stream's: calls_completed/calls_failed, heartbeats_sent,
    control_sent/control_received, control_malformed (undecodable control frames),
    send_dropped (bursts refused by a full send queue: recovered as losses), srtt and rto
    (seconds; srtt None before the first sample).
    """

    calls: int
    calls_completed: int
    calls_failed: int
    chunks_sent: int
    packets_sent: int
    bursts_sent: int
    bytes_sent: int
    retransmitted: int
    timeouts: int
    packets_received: int
    bursts_received: int
    bytes_received: int
    results: int
    duplicates_ignored: int
    wraps: int
    malformed: dict
    heartbeats_sent: int
    control_sent: int
    control_received: int
    control_malformed: int
    send_dropped: int
    srtt: float | None
    rto: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Clients not closed yet; `_leave_at_exit` closes them (the engine thread keeps each alive).
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _leave_at_exit() -> None:
    """Close every client the program did not close: LEAVE, bounded by `EXIT_LEAVE_S` in all.

    Runs at interpreter exit (atexit), while the clients' daemon engine threads still run. A
    program ending on an uncaught exception leaves with a reason naming it (the job is aborted
    for the others at once); a normal end leaves gracefully.
    """
    clients = list(_OPEN)
    if not clients:
        return
    error = getattr(sys, "last_value", None)
    reason = f"its process exited on an uncaught {error!r}" if error is not None else ""
    for client in clients:  # every LEAVE goes out at once, then each is waited for
        client._request_close(f"worker {client.rank} failed: {reason}" if reason else "")
    deadline = time.monotonic() + EXIT_LEAVE_S
    for client in clients:
        client.close(timeout=max(deadline - time.monotonic(), 0.0))


atexit.register(_leave_at_exit)


class _Broken(Exception):
    """Internal: the engine must stop; carries the error every pending call gets."""

    def __init__(self, error: SwitchError, leave_reason: str = "") -> None:
        super().__init__(str(error))
        self.error, self.leave_reason = error, leave_reason


class SwitchClient:
    """One worker's membership in one job on an emulated switch.

    Args:
        address: the switch's ZeroMQ endpoint, e.g. "tcp://127.0.0.1:5555".
        job: the job's name; the first JOIN creates it, later ones must agree with it.
        world_size: number of workers in the job.
        rank: this worker's rank, or None to let the switch pick a free one.
        config: a `ClientConfig` (defaults if None).
        token: shared secret: the job's, or the switch's when it runs with --token ("" for none).
        timeout: if given, overrides config.join_timeout and config.op_timeout (seconds).
        server_key: the switch's CURVE public key (z85, or the path of its `.key` file) when it
            runs with --curve-secret-file; None for a plain connection.
        identity: this client's ZeroMQ routing identity (default: random, fixed for its life).
        lane_bits: the job's lane width, 8, 16 or 32 bits per value (packets carry k lanes,
            k * lane_bits / 8 payload bytes); None takes the switch's default (its
            `--lane-bits`, 32 unless set). Every worker of a job must agree. The width in force
            is `self.lane_bits` once joined.

    Raises:
        ValueError: a malformed address, job name, token or lane width (before anything is
            started).
        JoinRejected: the switch refused the JOIN (the error's `field` names the culprit).
        SwitchTimeout: no JOIN_OK, or not every worker joined, within join_timeout.

    Use as a context manager; `allreduce` blocks, `allreduce_async` returns a Future. Calls are
    served in the order they were made, by all threads together.
    """

    def __init__(self, address: str, job: str, world_size: int, rank: int | None = None, *,
                 config: ClientConfig | None = None, token: str = "",
                 timeout: float | None = None, server_key: str | bytes | None = None,
                 identity: bytes | None = None, lane_bits: int | None = None) -> None:
        check_endpoint(address)
        if lane_bits is not None:
            check_lane_bits(lane_bits)
        config = config or ClientConfig()
        if timeout is not None:
            config = replace(config, join_timeout=timeout, op_timeout=timeout)
        self.config = config.validate()
        self.address, self.job = address, job
        self.world_size = world_size
        self.rank: int = -1
        self.job_id: int = -1
        self.k, self.slots = config.k, config.slots
        self.lane_bits: int = lane_bits or 32  # the switch's answer (JOIN_OK) once joined
        self._join_msg = Join(job, world_size, config.k, config.slots, token, rank, lane_bits)
        if identity is not None and (not isinstance(identity, bytes) or not 1 <= len(identity) <= 255
                                     or identity[:1] == b"\0"):
            raise ValueError("identity must be 1-255 bytes not starting with a zero byte")
        self.identity = identity if identity is not None else b"w" + os.urandom(15)
        self._server_key = (server_key if isinstance(server_key, bytes) or server_key is None
                            else load_public(server_key))
        self.incarnation = ""  # the switch's, from JOIN_OK
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._shut = False  # `_shutdown` ran
        self._shut_lock = threading.Lock()
        self._error: SwitchError | None = None
        self._machine: StreamMachine | None = None
        self._pipes: PipeLinks | None = None  # the switch's dataplane pipes, if it has several
        self._ctl = dict(calls_completed=0, calls_failed=0, heartbeats_sent=0, control_sent=0,
                         control_received=0, control_malformed=0, send_dropped=0)
        self._ctx = zmq.Context()
        wake = f"inproc://switchagg-client-{next(_CLIENT_IDS)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake)
        self._wake_lock = threading.Lock()
        self._joined: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._engine, name=f"switchagg-client-{job}",
                                        daemon=True)
        self._thread.start()
        _OPEN.add(self)
        # The engine bounds each wait by join_timeout; this bound only catches an engine bug.
        # (Not future.result(timeout): SwitchTimeout is a TimeoutError and would be confused.)
        concurrent.futures.wait([self._joined], timeout=2 * config.join_timeout + 10)
        if not self._joined.done():
            self._shutdown()
            raise SwitchTimeout(f"joining job {job!r} at {address} took over "
                                f"{2 * config.join_timeout + 10:.0f}s", job=job)
        if self._joined.exception() is not None:
            self._shutdown()
            raise self._joined.exception()

    # ---- public API --------------------------------------------------------------------------

    def __enter__(self) -> SwitchClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving because of an error aborts the job for everyone at once, rather than by timeout.
        self.close(reason=f"worker {self.rank} failed: {exc!r}" if exc is not None else "")

    def allreduce(self, values: np.ndarray, out: np.ndarray | None = None,
                  call: int | None = None) -> np.ndarray:
        """Sum `values` over every worker of the job, exactly (int32, wrapping like the hardware).

        With lanes narrower than 32 bits (`lane_bits` 8 or 16), every value must fit the lanes
        ([-2^(b-1), 2^(b-1) - 1]); the sum comes back as int32: the exact sum wrapped to the lane
        width (two's complement, as the switch adds), sign-extended.

        Args:
            values: 1-D np.ndarray of int32, any length (not modified).
            out: optional array to write the sum into (int32, C-contiguous, values' shape, not
                overlapping it). Reusing one saves page-faulting a fresh output on every call,
                which for large vectors costs as much as the transfer.
            call: this call's sequence number (default: one more than the previous call's; the
                first is 0). Every worker must give the same call the same number: the switch
                aborts the job when ranks' numbers differ (modulo 256) on the same chunks. A
                driver that may skip calls (a step skipped on a non-finite gradient) numbers
                them itself, e.g. step * calls_per_step + bucket.

        Returns:
            `out`, or a new int32 array of the same length: the element-wise sum.

        Raises:
            TypeError / ValueError: values is not a 1-D int32 ndarray, a value does not fit the
                job's lanes (never silently truncated), or out does not fit.
            JobAborted, SwitchTimeout: the job or the switch failed (see the class docstring).
        """
        return self._wait(self.allreduce_async(values, out=out, call=call))

    def allreduce_async(self, values: np.ndarray, out: np.ndarray | None = None,
                        call: int | None = None) -> concurrent.futures.Future:
        """Like `allreduce`, returning a Future of the sum. Do not modify `values` until it is done,
        nor read `out` before."""
        if not isinstance(values, np.ndarray):
            raise TypeError(f"allreduce takes a 1-D numpy int32 array, got {type(values).__name__}; "
                            f"pass np.asarray(x, dtype=np.int32)")
        if values.dtype != np.int32:
            raise TypeError(f"allreduce takes int32 values, got dtype {values.dtype}; quantize "
                            f"first, or pass x.astype(np.int32) if the values fit")
        if values.ndim != 1:
            raise ValueError(f"allreduce takes a 1-D array, got shape {values.shape}; pass "
                             f"x.reshape(-1) and reshape the result")
        if out is not None and (not isinstance(out, np.ndarray) or out.dtype != np.int32
                                or out.shape != values.shape or not out.flags.c_contiguous
                                or not out.flags.writeable or np.may_share_memory(out, values)):
            raise ValueError("out must be a writeable, C-contiguous int32 array of the same shape "
                             "as values, not overlapping it; allocate np.empty_like(values)")
        if call is not None and (not isinstance(call, (int, np.integer)) or call < 0):
            raise ValueError(f"call={call!r}: pass an int >= 0, or None to count calls")
        if self.lane_bits != 32:  # to the job's lanes: checked, then packed (one copy)
            values = pack_lanes(values, self.lane_bits)
        return self._submit(len(values), array_fill(values, self.k), stream=False, out=out,
                            call=call)

    def allreduce_stream(self, numel: int, fill: FillFn) -> tuple[np.ndarray, np.ndarray]:
        """All-reduce a vector that `fill` writes chunk by chunk, with a block exponent per packet.

        Args:
            numel: length of the vector.
            fill: `fill(first, stop, returned_exponents, values_out, exponents_out)`, called just
                before chunks [first, stop) are first sent (see `switchagg._stream.FillFn`);
                returned_exponents[j] is the max exponent returned for chunk first + j - slots.

        Returns:
            (sums, exponents): the int32 sums (numel long) and the int8 max exponent per chunk.

        With narrow lanes, what `fill` writes must fit them: a value that does not fails the call
        (JobAborted, its cause a ValueError naming the value and the lanes).
        """
        return self._wait(self.allreduce_stream_async(numel, fill))

    def allreduce_stream_async(self, numel: int, fill: FillFn) -> concurrent.futures.Future:
        """Like `allreduce_stream`, returning a Future of (sums, exponents)."""
        if not isinstance(numel, (int, np.integer)) or numel < 0:
            raise ValueError(f"numel={numel!r}: pass the vector's length, an int >= 0")
        if not callable(fill):
            raise TypeError("fill must be callable as fill(first, stop, returned_exponents, "
                            "values_out, exponents_out)")
        return self._submit(int(numel), fill, stream=True)

    def stats(self) -> ClientStats:
        """A snapshot of the counters (safe from any thread)."""
        m = self._machine
        data: dict[str, Any] = {f.name: 0 for f in fields(ClientStats)}
        data.update(malformed={}, srtt=None, rto=0.0)
        if m is not None:
            data.update((k, v) for k, v in m.counters.as_dict().items() if k in data)
            data.update(srtt=m.rto.srtt, rto=m.rto.rto)
        data.update(self._ctl)
        return ClientStats(**data)

    def close(self, reason: str = "", timeout: float | None = None) -> None:
        """LEAVE the job (a non-empty reason aborts it for every worker), stop, log the stats.

        Args:
            reason: why this worker stops early ("" for a normal end).
            timeout: the longest to wait for the LEAVE to go out and the engine to stop
                (default: config.leave_linger + 5 s). A program that never calls close leaves
                at interpreter exit (within EXIT_LEAVE_S in all).
        """
        if self._shut:
            return
        self._request_close(reason)
        if self._shutdown(timeout):
            log.info("switch client rank %d of job %r closed: %s", self.rank, self.job,
                     self.stats().as_dict())

    def _request_close(self, reason: str) -> None:
        """Ask the engine to LEAVE and stop (at most once), without waiting for it."""
        if not self._closed:
            self._closed = True
            self._requests.put(("close", reason))
            self._wake()

    def _leave_soon(self, reason: str = "") -> None:
        """`_request_close` for finalizers (garbage collection may run them in any thread, even
        one holding the wake lock): only the queue, which is safe there; the engine takes the
        request within a heartbeat interval, and `close` or the exit handler waits for it."""
        if not self._closed:
            self._closed = True
            self._requests.put(("close", reason))

    # ---- user-thread side --------------------------------------------------------------------

    def _submit(self, numel: int, fill: FillFn, stream: bool, out: np.ndarray | None = None,
                call: int | None = None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            raise JobAborted(f"this SwitchClient (rank {self.rank} of job {self.job!r}) is closed; "
                             f"open a new one", job=self.job, rank=self.rank)
        if self._error is not None:
            future.set_exception(self._error)
            return future
        if numel >= JIT_MIN_ELEMENTS:
            # The stream's compiled loops, loaded (or compiled, seconds on a cold cache) here in
            # the caller's thread: in the engine thread a compile would silence heartbeats and
            # the switch would declare this worker dead. Small calls never pay numba's load.
            load_kernels()
        self._requests.put(("call", numel, fill, stream, future, out, call))
        self._wake()
        return future

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the engine is gone or already has wake-ups queued; it drains requests anyway

    def _wait(self, future: concurrent.futures.Future):
        while True:
            done, _ = concurrent.futures.wait([future], timeout=_WAIT_SLICE)
            if done:
                return future.result()
            if not self._thread.is_alive():
                raise SwitchError(f"the client engine of rank {self.rank} stopped with this call "
                                  f"pending (see the log)", job=self.job, rank=self.rank)

    def _shutdown(self, timeout: float | None = None) -> bool:
        """Wait (bounded) for the engine to stop, then free the sockets; once. True if it ran."""
        with self._shut_lock:
            if self._shut:
                return False
            self._shut = True
        _OPEN.discard(self)
        self._thread.join(timeout=self.config.leave_linger + 5 if timeout is None else timeout)
        with self._wake_lock:
            self._wake_tx.close(linger=0)
        if not self._thread.is_alive():
            self._wake_rx.close(linger=0)
            self._ctx.term()
        return True

    # ---- engine thread -----------------------------------------------------------------------

    def _engine(self) -> None:
        sock = None
        try:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, int(self.config.leave_linger * 1000))
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.RCVHWM, 10_000)
            # One routing identity for the client's life: after a TCP reset ZeroMQ reconnects
            # with it, and the switch (ROUTER_HANDOVER) still knows this connection's rank.
            sock.setsockopt(zmq.IDENTITY, self.identity)
            if self._server_key is not None:
                client_options(sock, self._server_key)
            sock.connect(self.address)
            self._sock = sock
            try:
                self._join()
            except SwitchError as exc:
                self._joined.set_exception(exc)
                return
            self._joined.set_result(None)
            self._run()
        except BaseException as exc:  # a bug: fail every call rather than leave them hanging
            log.exception("switch client engine crashed")
            error = SwitchError(f"the switch client engine of job {self.job!r} stopped: {exc!r}",
                                job=self.job, rank=self.rank)
            error.__cause__ = exc
            self._fail_all(error)
            if not self._joined.done():
                self._joined.set_exception(error)
        finally:
            if sock is not None:
                sock.close()
            if self._pipes is not None:
                self._pipes.close()
            self._wake_rx.close(linger=0)

    def _send_control(self, message: ControlMessage) -> None:
        self._sock.send_multipart([FRAME_CONTROL, encode_control(message)])
        self._ctl["control_sent"] += 1

    def _leave(self, reason: str) -> None:
        """Send LEAVE; the protocol bounds the reason, so a long one is cut (the log has it all)."""
        if len(reason) > MAX_NAME_LEN:
            log.info("leaving job %r: %s", self.job, reason)
            reason = reason[:MAX_NAME_LEN - 3] + "..."
        self._send_control(Leave(self.job_id, self.rank, reason))

    def _recv_control(self, deadline: float) -> ControlMessage | None:
        """The next control message before `deadline` (data frames are ignored; joining only)."""
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(max(1, int(left * 1000))):
                continue
            frames = self._sock.recv_multipart()
            if len(frames) == 2 and frames[0] == FRAME_CONTROL:
                message = self._decode(frames[1])
                if message is not None:
                    return message
        return None

    def _decode(self, frame) -> ControlMessage | None:
        self._ctl["control_received"] += 1
        try:
            return decode_control(frame, MAX_REPLY_BYTES)
        except ProtocolError as exc:
            self._ctl["control_malformed"] += 1
            log.warning("dropped a malformed control message from the switch: %s", exc)
            return None

    def _join(self) -> None:
        cfg, addr = self.config, self.address
        self._send_control(self._join_msg)
        deadline = time.monotonic() + cfg.join_timeout
        while True:
            msg = self._recv_control(deadline)
            if msg is None:
                raise SwitchTimeout(f"no answer from switch at {addr} within {cfg.join_timeout}s; "
                                    f"is `switch-emulator --bind {addr}` running?", job=self.job)
            if isinstance(msg, Error):
                raise JoinRejected(f"switch at {addr} refused to join job {self.job!r}: "
                                   f"{msg.message} ({msg.code}"
                                   + (f", field {msg.field}={msg.value!r})" if msg.field else ")"),
                                   job=self.job, field=msg.field, value=msg.value)
            if isinstance(msg, JoinOk):
                break
        self.rank, self.job_id = msg.rank, msg.job_id
        self.incarnation = msg.incarnation
        # Any JOIN sent again (the first JOIN_OK was lost) asks for the rank the switch granted.
        self._join_msg = replace(self._join_msg, rank=msg.rank)
        self.k, self.slots, self.world_size = msg.k, msg.slots, msg.world_size
        self.lane_bits = msg.lane_bits
        self._hb_interval, self._liveness = msg.heartbeat_interval, msg.liveness_timeout
        burst = min(cfg.burst, msg.slots)
        if burst != cfg.burst:
            log.info("switch granted %d slots; bursts cut from %d to %d packets", msg.slots,
                     cfg.burst, burst)
        self._machine = StreamMachine(job_id=msg.job_id, rank=msg.rank, k=msg.k, slots=msg.slots,
                                      burst=burst, rto_initial=cfg.rto_initial,
                                      rto_min=cfg.rto_min, rto_max=cfg.rto_max,
                                      pipes=max(1, len(msg.pipes)), lane_bits=msg.lane_bits,
                                      compiled=None, window=cfg.window_for(msg.slots, burst))
        if msg.pipes:  # `switch-emulator --pipes P`: greet every pipe now, wait for them below
            self._pipes = PipeLinks(self._ctx, msg.pipes, addr, msg.job_id, msg.rank,
                                    msg.pipe_key, msg.slots, self._server_key)
        # Wait for READY, heartbeating so that the switch does not count us dead meanwhile.
        deadline = time.monotonic() + cfg.join_timeout
        next_heartbeat = 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_heartbeat:
                self._send_control(Heartbeat(self.job_id, self.rank))
                self._ctl["heartbeats_sent"] += 1
                next_heartbeat = now + self._hb_interval
            msg = self._recv_control(min(deadline, next_heartbeat))
            if isinstance(msg, Ready):
                if self._pipes is not None:
                    self._pipes.wait_ready(deadline)
                return
            if isinstance(msg, Abort):
                raise JobAborted(self._abort_text(msg), job=self.job, rank=msg.rank)
            if isinstance(msg, Error):
                raise JoinRejected(f"switch at {addr} dropped rank {self.rank} of job "
                                   f"{self.job!r} while waiting for the others: {msg.message}",
                                   job=self.job, field=msg.field, value=msg.value)
        joined = self._joined_count()
        who = (f"only {joined} of {self.world_size} workers" if joined is not None
               else f"not all {self.world_size} workers")
        raise SwitchTimeout(f"{who} joined job {self.job!r} at {addr} within {cfg.join_timeout}s; "
                            f"start the missing workers (or check their --job and --world-size)",
                            job=self.job, rank=self.rank)

    def _joined_count(self) -> int | None:
        """Ask the switch how many workers joined (best effort, for the error message)."""
        self._send_control(StatsRequest(self.job_id))
        deadline = time.monotonic() + self.config.query_timeout
        while (msg := self._recv_control(deadline)) is not None:
            if isinstance(msg, StatsReply):
                job = msg.stats.get("jobs", {}).get(str(self.job_id), {})
                joined = job.get("joined")
                return joined if isinstance(joined, int) else None
        return None

    def _abort_text(self, msg: Abort) -> str:
        who = f" because of worker {msg.rank}" if msg.rank is not None else ""
        return (f"job {self.job!r} was aborted by the switch{who}: {msg.reason}; "
                f"restart the job")

    def _run(self) -> None:
        m = self._machine
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        pipe_socks = self._pipes.sockets if self._pipes is not None else []
        for pipe_sock in pipe_socks:
            poller.register(pipe_sock, zmq.POLLIN)
        now = time.monotonic()
        self._last_heard = now
        next_heartbeat = now + self._hb_interval
        query_deadline: float | None = None
        query_sent = 0.0
        query_text = ""
        while True:
            wake_at = next_heartbeat
            if m.busy:
                quiet = max(self._last_heard, m.last_progress)
                wake_at = min(wake_at, quiet + self._liveness,
                              m.last_progress + self.config.op_timeout)
                if (d := m.next_deadline()) is not None and d < wake_at:
                    wake_at = d
                if query_deadline is not None and query_deadline < wake_at:
                    wake_at = query_deadline
            wait_ms = max(0, int((wake_at - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(wait_ms))
            try:
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                # Requests are taken every turn, not only on a wake-up: a wake-up is a hint.
                if self._take_requests():
                    return
                for pipe_sock in pipe_socks:
                    if pipe_sock in events:
                        self._receive_pipe(pipe_sock)
                if self._sock in events:
                    reply = self._receive()
                    if isinstance(reply, QueryReply) and query_deadline is not None:
                        raise _Broken(SwitchTimeout(query_text + self._query_text(reply),
                                                    job=self.job, rank=self.rank),
                                      leave_reason=query_text)
                now = time.monotonic()
                if now >= next_heartbeat:
                    if self._error is None:  # a failed job needs no more heartbeats
                        self._send_control(Heartbeat(self.job_id, self.rank))
                        self._ctl["heartbeats_sent"] += 1
                    next_heartbeat = now + self._hb_interval
                if m.busy:
                    silent = now - max(self._last_heard, m.last_progress)
                    if silent > self._liveness:
                        raise _Broken(SwitchTimeout(
                            f"switch at {self.address} sent nothing (no result, no heartbeat "
                            f"ack) for {silent:.1f}s while an all-reduce of job {self.job!r} was "
                            f"pending; is it still running?", job=self.job, rank=self.rank))
                    if query_deadline is not None and m.last_progress > query_sent:
                        query_deadline = None  # progress resumed while the QUERY was out
                    if query_deadline is None and now - m.last_progress > self.config.op_timeout:
                        slots, versions, n = m.stuck(_QUERY_SLOTS)
                        query_text = (f"all-reduce of job {self.job!r} (rank {self.rank}) made no "
                                      f"progress for {now - m.last_progress:.1f}s: {n} chunks "
                                      f"outstanding, oldest on slots {slots}")
                        self._send_control(Query(self.job_id, slots, versions))
                        query_deadline, query_sent = now + self.config.query_timeout, now
                    elif query_deadline is not None and now > query_deadline:
                        raise _Broken(SwitchTimeout(query_text + "; the switch did not say which "
                                                    "workers it misses", job=self.job,
                                                    rank=self.rank), leave_reason=query_text)
                else:
                    query_deadline = None
                try:
                    bursts = m.transmit_frames(now)
                except Exception as exc:  # a user fill() raised: this stream cannot go on
                    error = JobAborted(f"rank {self.rank} stopped job {self.job!r}: a fill "
                                       f"function raised {exc!r}", job=self.job, rank=self.rank)
                    error.__cause__ = exc
                    raise _Broken(error, leave_reason=str(error)) from exc
                self._send_bursts(bursts)
            except _Broken as broken:
                self._fail_all(broken.error)
                if broken.leave_reason:
                    self._leave(broken.leave_reason)

    def _query_text(self, reply: QueryReply) -> str:
        missing = sorted({r for ranks in reply.missing if isinstance(ranks, list) for r in ranks})
        text = f"; the switch misses worker(s) {missing} on them"
        if reply.departed:
            text += f" (departed: {reply.departed})"
        return text + "; check that every worker calls allreduce with the same sizes"

    def _take_requests(self) -> bool:
        """Serve queued requests in order; True if the engine must stop."""
        m = self._machine
        while not self._requests.empty():  # checked every engine turn: no exception when empty
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return False
            if request[0] == "close":
                self._fail_all(JobAborted(f"SwitchClient of rank {self.rank} closed with this "
                                          f"all-reduce pending", job=self.job, rank=self.rank))
                self._leave(request[1])
                return True
            _, numel, fill, stream, future, out, seq = request
            if not future.set_running_or_notify_cancel():
                continue
            if self._error is not None:
                self._ctl["calls_failed"] += 1
                future.set_exception(self._error)
                continue
            m.refresh_kernels()  # loaded by a caller's thread since the previous call, maybe
            call = m.submit(numel, fill, time.monotonic(), token=(future, stream), out=out,
                            seq=seq)
            if call.complete:  # numel == 0
                self._complete(call)
        return False

    def _complete(self, call: StreamCall) -> None:
        future, stream = call.token
        self._ctl["calls_completed"] += 1
        future.set_result((call.result(), call.exponents) if stream else call.result())

    def _receive(self) -> ControlMessage | None:
        """Drain the data socket; returns the last QUERY_REPLY seen, if any."""
        m, sock, found = self._machine, self._sock, None
        for _ in range(_DRAIN):
            # Ask before receiving: a zmq.Again raised on every turn costs more than the question.
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                break
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._last_heard = time.monotonic()
            if len(frames) == 3 and frames[0].bytes == FRAME_DATA:  # split: headers, payloads
                for call in m.receive_split(frames[1].buffer, frames[2].buffer, self._last_heard):
                    self._complete(call)
                continue
            if len(frames) != 2:
                self._ctl["control_malformed"] += 1
                continue
            kind = frames[0].bytes
            if kind == FRAME_DATA:
                for call in m.receive(frames[1].buffer, self._last_heard):
                    self._complete(call)
            elif kind == FRAME_CONTROL:
                msg = self._decode(frames[1].bytes)
                if isinstance(msg, Abort):
                    raise _Broken(JobAborted(self._abort_text(msg), job=self.job, rank=msg.rank))
                if isinstance(msg, QueryReply):
                    found = msg
                elif isinstance(msg, HeartbeatAck):
                    self._check_incarnation(msg.incarnation)
                elif isinstance(msg, Error) and msg.code in _MEMBERSHIP_LOST:
                    raise _Broken(JobAborted(
                        f"the switch at {self.address} no longer counts rank {self.rank} in job "
                        f"{self.job!r} ({msg.code}: {msg.message}); if it restarted, it lost the "
                        "job: restart the job", job=self.job, rank=self.rank))
                elif isinstance(msg, Error) and self._error is None:
                    log.warning("switch at %s: %s (%s)", self.address, msg.message, msg.code)
                elif not isinstance(msg, (StatsReply, Ready, JoinOk, type(None))):
                    log.debug("ignored %s from the switch", type(msg).__name__)
            else:
                self._ctl["control_malformed"] += 1
        return found

    def _check_incarnation(self, incarnation: str) -> None:
        if incarnation and self.incarnation and incarnation != self.incarnation:
            raise _Broken(JobAborted(
                f"the switch at {self.address} restarted (incarnation {self.incarnation} is now "
                f"{incarnation}) and lost job {self.job!r}; restart the job", job=self.job,
                rank=self.rank))

    def _receive_pipe(self, sock: zmq.Socket) -> None:
        """Drain one pipe's socket: split result messages (anything else is counted)."""
        m = self._machine
        for _ in range(_DRAIN):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                break
            frames = sock.recv_multipart(_NOBLOCK, copy=False)
            self._last_heard = time.monotonic()
            if len(frames) == 3 and frames[0].bytes == FRAME_DATA:
                for call in m.receive_split(frames[1].buffer, frames[2].buffer, self._last_heard):
                    self._complete(call)
            else:
                self._ctl["control_malformed"] += 1

    def _send_bursts(self, bursts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if self._pipes is not None:
            for heads, vals in bursts:
                for sock, h, v in self._pipes.route(heads, vals):
                    try:
                        sock.send(FRAME_DATA, _NOBLOCK | _SNDMORE)
                        sock.send(h, _NOBLOCK | _SNDMORE, copy=False)
                        sock.send(v, _NOBLOCK, copy=False)
                    except zmq.Again:
                        self._ctl["send_dropped"] += 1
            return
        for heads, vals in bursts:
            try:
                # A split message [FRAME_DATA, header words, payloads], copy=False: a ring slice
                # is rewritten, and the caller's array may change, only after the result came
                # back (the switch got it); retransmissions are fresh copies.
                # Separate sends, not send_multipart: it rebuilds the flags with enum arithmetic.
                # Once the first part is queued, ZeroMQ takes the rest of the message too.
                self._sock.send(FRAME_DATA, _NOBLOCK | _SNDMORE)
                self._sock.send(heads, _NOBLOCK | _SNDMORE, copy=False)
                self._sock.send(vals, _NOBLOCK, copy=False)
            except zmq.Again:
                self._ctl["send_dropped"] += 1  # like a lost frame: the RTO resends it

    def _fail_all(self, error: SwitchError) -> None:
        """Fail every pending and queued call, and every later one, with `error`."""
        if self._error is None:
            self._error = error
        if self._machine is not None:
            for call in self._machine.abandon():
                self._ctl["calls_failed"] += 1
                future, _ = call.token
                if not future.done():
                    future.set_exception(error)
        # Calls still queued fail as `_take_requests` reaches them (self._error is set).
