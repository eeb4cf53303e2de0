"""The worker's side of the aggregation protocol, as a machine with no I/O.

What it owns: turning all-reduce calls into a stream of DATA packets and RESULT packets back into
sums (the wire format: switchagg/packet.py): the packetizer, the self-clocked window over the slot
pool, retransmission with an RTT estimate, and reassembly. What it must never do: open a socket, read a clock, sleep or
start a thread. Like h11's `Connection`, bytes go in (`receive`), the caller passes the time, and
what comes back says what to send (`transmit`) and when the machine next needs to be woken
(`next_deadline`). `switchagg.client` wraps it in a ZeroMQ engine thread; tests join it to the
switch's dataplane in memory (tests/fakelink.py).

How it works:
- Chunks. A call of `numel` int32 is ceil(numel / k) chunks of k values (the last one zero-padded).
  A global chunk counter g runs on across calls: chunk g uses slot g mod s, version (g div s) mod 2,
  header `chunk` = g mod 2^32. So versions keep alternating between calls, as SwitchML's pool-index
  shift does, and a late result of an earlier call can never be taken for one of this call.
- Lanes. A job's packets carry k lanes of 8, 16 or 32 bits (`lane_bits`, from JOIN_OK). The
  machine holds everything it sends and receives in the lanes' dtype (ring staging, outputs,
  the caller's array once packed), so the wire path is the same at every width: a plain
  all-reduce's int32 input is checked and packed once before it is submitted (`pack_lanes`,
  vectorized: a value outside the lanes raises ValueError, it is never truncated), a fill
  function writes int32 into a scratch that is checked and packed the same way, and a call's
  sums are sign-extended back to int32 once, when it completes (`StreamCall.result`).
- Window (self-clocking). Chunk g + s is sent only after the result of chunk g arrived, i.e. only
  into a free slot, and at most `window` chunks (<= s) are outstanding. Chunks are first sent in
  order; a burst of up to B packets leaves once B slots in a row are free and the window has
  room for it (or all that is left of the queued calls fits), so bursts stay large. A window
  smaller than the pool is slack for loss: a lost chunk holds its slot until its resend is
  answered, a round trip or two; with window = s the first send s chunks later waits for that
  slot at once, with window = s / 2 only after another half pool of first sends (the client's
  default; at 1% loss, 4 workers: about 10% more throughput, none lost without loss).
- Buffers (zero copy). A burst travels split (switchagg.packet): its header words, a contiguous
  slice of a ring of s preallocated headers (chunk g's is ring[g mod s]), and its payloads. For a
  plain all-reduce the payloads are a slice of the caller's own array, sent as it is; only fill
  functions (quantizing on the fly) and a call's last, partial chunk write into the ring's
  staging rows. A burst never straddles a call, nor the range of one switch pipe. Both are sent
  without copying, and the protocol proves them unchanged while the switch may still need them:
  the ring entry is rewritten only for chunk g + s, after chunk g's result came back (which
  exists only once the switch received our packet), and the caller may not touch its array
  before the call completes. Retransmissions are copies (fancy indexing, from the ring or the
  caller's array), so a queued retransmission can never see a rewritten entry. Results are
  copied once, from the received frame into the call's output (libzmq has no receive into a
  user buffer without that copy).
- Reception. A RESULT/RESULT_RETX burst is validated, each packet is matched to the chunk
  outstanding on its slot (same version and chunk number; anything else is a late duplicate, counted
  and ignored), and matched values are copied into the call's (chunks, k) output. With numba this is
  one compiled pass over the frame (`_stream_jit.take_results`); without it, or when a burst holds
  a bad packet, the numpy reference path runs (`packet.validate_burst` gives reasons and counts).
- Loss recovery (SwitchML's identical resends, timed the way RACK-TLP times TCP's, RFC 8985).
  What a worker can tell from an answer: a chunk's result exists only once every worker's packet
  for it reached the switch, and each worker's packets travel in order (one FIFO connection per
  slot range), so the answer to a chunk this worker sent *once* proves that all its earlier
  packets passed the switch too. An answer to a *resent* chunk proves much less: another
  worker's resend may have completed the slot while ours still waits behind our own bursts (a
  slot missing worker A's packet is completed only by A's resend; everyone else's copies are
  dropped as duplicates). Taking such answers as proof resent whole bursts still in flight (a
  third to a half of all packets resent at 1% loss, issue 15). So:
  1. Gap (SACK-like, timed as RACK). A chunk still outstanding, sent before the latest-sent
     answered chunk that was sent once, is passed: it is lost once a reordering window has gone
     by since it was first passed (or since that answer's RTT after its send, RACK's rule,
     if sooner), and resent at once, without waiting for a timer. (RACK's rule alone waits too
     long here: a window's bursts leave together and are answered one after another as the
     switch works through them, so each later answer's RTT pushed an early gap's deadline back,
     and the window drained before any gap was resent.) The window is RACK's min RTT / 4; once
     reordering has been seen (a chunk sent once answered after a later-sent one, sooner than a
     resend could have completed its slot; always with several pipes, whose results interleave)
     it is at least rto_min, for REORDER_MEMORY smoothed RTTs. Skew (a late peer) delays every
     later chunk alike and marks nothing.
  2. Lost resends. A resent chunk is judged by the same rule against the latest-resent answered
     chunk too (resends of one frame travel together), with a delay of at least the min RTT plus
     at least rto_min (with less, other workers' resends answering first made resends of
     resends snowball: 3x the packets): a resend lost again is found within about a round trip,
     not an RTO.
  3. Timeout (RTO). When nothing has been answered for RTO, every outstanding chunk that an
     answer already passed (rule 1's gap, resent and still missing) is resent, plus the oldest
     outstanding chunk as a probe (every outstanding chunk when nothing is queued and at most
     TAIL_RESEND are left, as at a call's end); the RTO doubles. A late peer costs one packet
     per (doubling) RTO; a call's tail and a stalled window are resent at once. At a call's
     tail the timeout is the tail-loss probe's (RACK-TLP's PTO): 2 min RTT, not the RTO, whose
     srtt and rttvar measure bulk bursts waiting in the switch's queue (5-20x the min RTT under
     load); it doubles at most PROBE_BACKOFFS times, since its probes go unanswered while
     another worker's lost packet holds the slot. There a late peer costs at most TAIL_RESEND
     packets per 4 probe timeouts.
  RTO follows RFC 6298: srtt/rttvar from one sample per received burst, its latest-sent chunk
  sent once (Karn's rule), so that the samples measure the network and the switch rather than
  resends; clamped to [rto_min, rto_max]; doubled on every timeout, and back to srtt + 4 rttvar at
  the next accepted result (answers to resent chunks prove the path, though they give no
  sample), so backoff never outlives a loss burst. Only the chunks found lost are resent, as
  identical copies, oldest first. Both rules scan the slot pool (s entries) once per received
  burst at most: with numba in one compiled pass each (`_stream_jit.rack_lost`, `oldest_sent`,
  the latter cached until the slot state changes), else in numpy (the reference).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from switchagg.packet import (
    DEFAULT_LANE_BITS, HEADER_DTYPE, HEADER_WORDS, MAGIC, PROTOCOL_VERSION, Kind, SLOT_MASK,
    VERSION_BIT, check_lane_bits, join_split, lane_dtype, lane_range, packet_bytes, parse_burst,
    parse_split, pipe_bounds, validate_burst,
)

__all__ = ["FillFn", "RtoEstimator", "StreamCall", "StreamCounters", "StreamMachine", "array_fill",
           "load_kernels", "pack_lanes", "check_lanes"]

log = logging.getLogger(__name__)

_CHUNK_MOD = 1 << 32
#: A timeout resends every outstanding chunk when no more than this many are left and nothing is
#: queued (a few packets: cheap even when a late peer, not a loss, holds them up).
TAIL_RESEND = 64
#: The tail-loss probe's timeout doubles at most this many times. Its probes go unanswered while
#: another worker's lost packet holds the slot (the switch ignores a copy it already counted), so
#: a full backoff made the one worker whose result was lost next wait 16-32 probe timeouts (issue
#: 15: the slowest calls at 10% loss); SwitchML's own timer does not back off at all.
PROBE_BACKOFFS = 2
#: Reordering seen within this many smoothed RTTs keeps the wide reordering window (rto_min).
REORDER_MEMORY = 32
_kernels = None  # the `_stream_jit` module once loaded, False if numba is unavailable
#: A client loads the compiled loops at its first call of at least this many elements (numba's
#: load costs about half a CPU second; smaller calls are a few bursts, served as fast by numpy).
JIT_MIN_ELEMENTS = 1 << 16


def load_kernels():
    """Import and load (or compile, once per machine under the compile lock) the compiled loops
    once per process; None without numba.

    Call it before time-critical work, never from a thread that must not stall (a client's
    engine thread: a cold compile takes seconds). `SwitchClient` calls it from the caller's
    thread at the first call of `JIT_MIN_ELEMENTS` or more.
    """
    global _kernels
    if _kernels is None:
        try:
            from switchagg.warmup import warm_up_stream
            warm_up_stream()
            from switchagg import _stream_jit
            _kernels = _stream_jit
        except Exception as exc:  # noqa: BLE001 - numba missing or broken: the numpy path serves
            log.warning("switchagg: compiled stream kernels unavailable (%r); using numpy", exc)
            _kernels = False
    return _kernels or None


def check_lanes(values: np.ndarray, lane_bits: int) -> None:
    """Raise ValueError if any of `values` does not fit lanes of `lane_bits` (vectorized)."""
    if lane_bits >= 32 or not values.size:
        return
    lo, hi = lane_range(lane_bits)
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < lo or vmax > hi:
        bad = vmin if vmin < lo else vmax
        where = int(np.flatnonzero(values.reshape(-1) == bad)[0])
        raise ValueError(f"value {bad} (element {where}) does not fit the job's {lane_bits}-bit "
                         f"lanes [{lo}, {hi}]; scale or clip the values to the lanes first (an "
                         f"integer budget of --bits {lane_bits} or less does), or join with wider "
                         f"lanes (lane_bits=16 or 32)")


def pack_lanes(values: np.ndarray, lane_bits: int) -> np.ndarray:
    """int32 values as a new array of lanes of `lane_bits` (int8, int16; int32 as it is).

    Raises:
        ValueError: a value does not fit the lanes (named, with the range): never truncated.
    """
    if check_lane_bits(lane_bits) == 32:
        return values
    check_lanes(values, lane_bits)
    return values.astype(lane_dtype(lane_bits))


def loaded_kernels():
    """The compiled loops if this process has loaded them already (never loads); else None."""
    return _kernels or None


class FillFn(Protocol):
    """Writes the payload of chunks [first, stop) of a call just before they are first sent.

    Args:
        first, stop: chunk range, relative to the call.
        returned_exponents: (stop - first,) int8; entry j is the max exponent the switch returned
            for chunk first + j - s of this call (0 where first + j < s).
        values_out: (stop - first, k) int32 to fill (padding of the last chunk included).
        exponents_out: (stop - first,) int8 block exponents to put in those packets.
    """

    def __call__(self, first: int, stop: int, returned_exponents: np.ndarray,
                 values_out: np.ndarray, exponents_out: np.ndarray) -> None: ...


def array_fill(values: np.ndarray, k: int) -> FillFn:
    """The fill of a plain all-reduce: copy the array in, zero the padding, exponent 0.

    Args:
        values: 1-D array (not modified) of the job's lanes (int32, or packed by `pack_lanes`).
        k: values per packet.
    """
    numel = len(values)

    def fill(first: int, stop: int, returned_exponents: np.ndarray, values_out: np.ndarray,
             exponents_out: np.ndarray) -> None:
        lo, hi = first * k, min(stop * k, numel)
        whole = (hi - lo) // k
        if whole:
            values_out[:whole] = values[lo:lo + whole * k].reshape(whole, k)
        if whole < stop - first:  # the call's last, partial chunk
            tail = hi - lo - whole * k
            values_out[whole, :tail] = values[lo + whole * k:hi]
            values_out[whole, tail:] = 0
        exponents_out[:] = 0

    fill.source = values  # the machine sends whole chunks straight from here (no fill copy)
    return fill


@dataclass
class StreamCounters:
    """What the machine counts (the client adds control-plane counters to these)."""

    calls: int = 0                  # calls submitted
    chunks_sent: int = 0            # chunks sent for the first time
    packets_sent: int = 0           # packets sent, retransmissions included
    bursts_sent: int = 0            # data frames sent
    bytes_sent: int = 0             # bytes of data frames sent
    retransmitted: int = 0          # packets resent (found lost by a gap, or on a timeout)
    timeouts: int = 0               # RTO expiries (each resends the passed chunks and a probe)
    packets_received: int = 0       # packets in received data frames (valid or not)
    bursts_received: int = 0        # data frames received
    bytes_received: int = 0         # bytes of data frames received
    results: int = 0                # results accepted (each completes one chunk)
    duplicates_ignored: int = 0     # valid results for no outstanding chunk (late or repeated)
    wraps: int = 0                  # accepted results whose sum wrapped int32 at the switch
    malformed: dict = field(default_factory=dict)  # dropped packets, by `packet.BAD_REASONS`

    def as_dict(self) -> dict:
        return {f.name: (dict(getattr(self, f.name)) if f.name == "malformed"
                         else getattr(self, f.name)) for f in fields(self)}


class RtoEstimator:
    """TCP's retransmission timer (RFC 6298) with Karn's rule left to the caller.

    Args:
        initial: RTO before the first sample, seconds.
        minimum, maximum: bounds of the RTO, seconds.
    """

    def __init__(self, initial: float, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = min(max(initial, minimum), maximum)
        self.backoffs = 0  # timeouts since the last answer: how often `rto` was doubled

    def sample(self, rtt: float) -> None:
        """Fold in one round-trip time of a chunk that was sent once (Karn's rule)."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.minimum), self.maximum)
        self.backoffs = 0

    def backoff(self) -> None:
        """A timeout fired: double the RTO (kept until the next answer)."""
        self.rto = min(2 * self.rto, self.maximum)
        self.backoffs += 1

    def probe_timeout(self, rtt: float) -> float:
        """The tail-loss probe's timeout for a path whose unloaded round trip is `rtt`: twice
        that (RACK-TLP's PTO, RFC 8985, takes 2 srtt), at least the minimum, doubled on timeouts
        as the RTO is but at most `PROBE_BACKOFFS` times, and never longer than the RTO."""
        return min(self.rto, max(2 * rtt, self.minimum) * (1 << min(self.backoffs, PROBE_BACKOFFS)))

    def restore(self) -> None:
        """An answer arrived (the path works again): undo the backoff, back to the RTO the
        samples give, as TCP stacks do on an ACK of new data. Without it a lossy stretch leaves
        the timer at its ceiling until a chunk sent once is answered, and near a call's end
        every outstanding chunk has been resent (issue 15: calls of 2-12 s at 10% loss)."""
        if self.srtt is not None:
            self.rto = min(max(self.srtt + 4 * self.rttvar, self.minimum), self.maximum)
            self.backoffs = 0


class StreamCall:
    """One all-reduce in flight: its chunk range, its fill, and its output.

    Attributes:
        first_chunk: global index of the call's chunk 0.
        numel, nchunks: length of the vector, and in chunks.
        sums: (nchunks, k) output in the job's lanes; `result()` views its first numel values
            (sign-extended to int32 with lanes narrower than 32). With `out`, int32 lanes and
            numel a multiple of k, it is `out` itself, reshaped (results land in place).
        exponents: (nchunks,) int8 max exponent the switch returned per chunk.
        sent, done: chunks first-sent, and chunks whose result arrived.
    """

    __slots__ = ("first_chunk", "numel", "nchunks", "fill", "sums", "exponents", "sent", "done",
                 "token", "out", "seq", "source", "whole")

    def __init__(self, first_chunk: int, numel: int, k: int, fill: FillFn, token: object,
                 out: np.ndarray | None = None, seq: int = 0, lanes=np.int32) -> None:
        self.first_chunk = first_chunk
        self.seq = seq  # the call's sequence number, sent mod 256 in every packet's call byte
        self.numel = numel
        self.nchunks = -(-numel // k)
        self.fill = fill
        self.out = out
        # A plain all-reduce's input, as (whole chunks, k) rows sent without copying (None for
        # other fills); `whole` chunks come from it, the partial last one from the ring's staging.
        source = getattr(fill, "source", None)
        self.whole = numel // k if source is not None else 0
        self.source = source[:self.whole * k].reshape(self.whole, k) if source is not None else None
        # Results go straight into the caller's buffer when it has no partial chunk: a fresh
        # 64 MiB output costs more to page-fault than the whole transfer (about 0.1 to 0.3 s of
        # the 2-core VM's time per call, most of it in the kernel's huge-page compaction).
        narrow = np.dtype(lanes) != np.int32
        self.sums = (out.reshape(self.nchunks, k) if out is not None and not narrow
                     and numel == self.nchunks * k else np.empty((self.nchunks, k), lanes))
        self.exponents = np.zeros(self.nchunks, np.int8)
        self.sent = 0
        self.done = 0
        self.token = token  # the caller's handle (the client keeps its Future here)

    @property
    def complete(self) -> bool:
        return self.done == self.nchunks

    def result(self) -> np.ndarray:
        """The int32 sums, numel long: `out` if one was given, else a view of `sums` (no copy;
        with narrower lanes, a new int32 array of them sign-extended)."""
        flat = self.sums.reshape(-1)[:self.numel]
        if self.out is None:
            return flat if flat.dtype == np.int32 else flat.astype(np.int32)
        if self.out.size and not np.shares_memory(flat, self.out):  # the padded case
            self.out[:] = flat
        return self.out


class StreamMachine:
    """The sans-IO worker protocol: calls in, bursts out, results in, sums out.

    Args:
        job_id, rank: header fields from JOIN_OK.
        k, slots: packet size and pool size of the job.
        lane_bits: the job's lane width (8, 16 or 32; JOIN_OK says): what sources, fills and
            results are held in (see the module essay).
        burst: packets per data frame, at most `slots`.
        rto_initial, rto_min, rto_max: retransmission timer, seconds (see `RtoEstimator`).
        compiled: True loads the numba kernels now where they load (`load_kernels`); None uses
            them once the process has loaded them (`refresh_kernels`, between calls: both paths
            keep the same state); False forces the numpy reference path (tests run both).
        tail_resend: a timeout resends every outstanding chunk when nothing is queued and at
            most this many are outstanding (0: only the passed ones and the oldest).
        pipes: the switch's dataplane pipes; first-send bursts never straddle the bounds of their
            slot ranges (`packet.pipe_bounds`), so each burst goes to one pipe.
        window: chunks outstanding at most, in [burst, slots] (default: slots).
    """

    def __init__(self, *, job_id: int, rank: int, k: int, slots: int, burst: int,
                 rto_initial: float = 0.2, rto_min: float = 0.02, rto_max: float = 2.0,
                 compiled: bool | None = True, tail_resend: int = TAIL_RESEND, pipes: int = 1,
                 lane_bits: int = DEFAULT_LANE_BITS, window: int | None = None) -> None:
        if not 1 <= burst <= slots:
            raise ValueError(f"burst={burst} must be in [1, slots={slots}]")
        window = slots if window is None else window
        if not burst <= window <= slots:
            raise ValueError(f"window={window} must be in [burst={burst}, slots={slots}]")
        self.window = window
        self.job_id, self.rank, self.k, self.slots, self.burst = job_id, rank, k, slots, burst
        self.lane_bits = check_lane_bits(lane_bits)
        self._lanes = lane_dtype(lane_bits)
        self._fill_scratch: np.ndarray | None = None  # int32 rows a fill writes (narrow lanes)
        self.rto = RtoEstimator(rto_initial, rto_min, rto_max)
        self.tail_resend = tail_resend
        self.counters = StreamCounters()
        self._packet_bytes = packet_bytes(k, lane_bits)
        # Where a burst starting at slot i must end at the latest: the next pipe's first slot.
        bounds = pipe_bounds(slots, pipes)
        self._range_end = np.repeat(bounds[1:], np.diff(bounds)) if pipes > 1 else None
        self._compiled = compiled
        self._jit = (load_kernels() if compiled else loaded_kernels() if compiled is None
                     else None)
        # The ring: one packet per slot, as header words and a payload staging row. A plain
        # all-reduce's payload goes straight from the caller's array; the staging row serves
        # fill functions and a call's last, partial chunk.
        self._ring_heads = np.zeros(slots, HEADER_DTYPE)
        self._ring_heads["magic"] = MAGIC
        self._ring_heads["version"] = PROTOCOL_VERSION
        self._ring_heads["kind"] = Kind.DATA
        self._ring_heads["job"] = job_id
        self._ring_heads["worker"] = rank
        self._ring_words = self._ring_heads.view(np.int32).reshape(slots, HEADER_WORDS)
        self._ring_values = np.zeros((slots, k), self._lanes)
        self._direct = np.zeros(slots, bool)        # per slot: payload sent from the caller's array
        self._exps = np.zeros(slots, np.int8)       # scratch: a burst's exponents
        self._other = np.zeros(slots, np.int64)     # scratch: packets of calls beyond the first
        # Per slot: is a chunk outstanding, which one (global g), when last sent, resent yet.
        self._busy = np.zeros(slots, bool)
        self._chunk = np.full(slots, -1, np.int64)
        self._sent_at = np.zeros(slots, np.float64)
        self._resent = np.zeros(slots, bool)
        self._passed_at = np.full(slots, np.inf)  # when an answer first passed the chunk (gap)
        # A resent chunk's slot is not reused before its last copy can have left the network
        # (rto_min, the longest a packet is assumed held): a late copy of chunk g arriving after
        # chunk g + s would count at the switch as a new contribution to the other version.
        self._hold_until = np.zeros(slots, np.float64)
        self._hold_max = -np.inf
        self._lost = np.zeros(slots, np.int64)      # scratch: slots found lost
        self._oldest: float | None = None           # cache of _oldest_sent(); None: stale
        self._outstanding = 0
        self._next_chunk = 0            # global index of the next chunk to first-send
        self._calls: deque[StreamCall] = deque()   # submitted, not yet complete, in chunk order
        self.next_seq = 0               # sequence number of the next call (packet.py: call byte)
        self._queued_chunks = 0         # chunks of submitted calls not yet first-sent
        self.last_progress = 0.0        # time of the last accepted result (or of going busy)
        # Loss detection by time order (RACK): the latest-sent chunk known delivered, its RTT,
        # and when an outstanding chunk sent before it is next due to count as lost.
        self.min_rtt = float("inf")
        self._rack_sent, self._rack_chunk, self._rack_rtt = -np.inf, -1, 0.0
        self._rr_sent, self._rr_chunk, self._rr_rtt = -np.inf, -1, 0.0
        self._points = np.zeros(6)
        # The compiled pass's output when no call is pending (late answers only: nothing busy,
        # so nothing is written; a burst of them is checked and counted in one pass too).
        self._no_sums = np.zeros((0, k), self._lanes)
        self._no_exps = np.zeros(0, np.int8)
        # Reordering last seen (a chunk sent once answered after a later-sent one); with several
        # pipes results of different slot ranges interleave freely: reordering is always there.
        self._reordered_at = np.inf if pipes > 1 else -np.inf
        self._rack_due = np.inf
        self._last_probe = -np.inf
        self._last_transmit = -np.inf

    # ---- calls -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Is any call in progress?"""
        return bool(self._calls)

    def refresh_kernels(self) -> None:
        """With compiled=None: take up the compiled loops if the process loaded them since."""
        if self._jit is None and self._compiled is None:
            self._jit = loaded_kernels()

    def submit(self, numel: int, fill: FillFn, now: float, token: object = None,
               out: np.ndarray | None = None, seq: int | None = None) -> StreamCall:
        """Queue an all-reduce of `numel` values; chunks go out from the next `transmit`.

        Args:
            out: optional C-contiguous int32 array of numel to receive the sums (checked by the
                caller); the call's `result()` is then `out`.
            seq: the call's sequence number (default: one more than the previous call's). Every
                worker must give the same call the same number: the switch refuses to add chunks
                of calls whose numbers differ (modulo 256).

        Returns:
            The call; it is complete at once when numel == 0.
        """
        if numel < 0:
            raise ValueError(f"numel={numel} must be >= 0")
        if seq is None:
            seq = self.next_seq
        elif not isinstance(seq, (int, np.integer)) or seq < 0:
            raise ValueError(f"seq={seq!r} must be an int >= 0")
        self.next_seq = int(seq) + 1
        source = getattr(fill, "source", None)
        if source is not None and source.dtype != self._lanes:
            raise ValueError(f"a plain all-reduce's values must be packed to the job's "
                             f"{self.lane_bits}-bit lanes first (pack_lanes), got {source.dtype}")
        call = StreamCall(self._next_chunk + self._queued_chunks, numel, self.k, fill, token, out,
                          int(seq), self._lanes)
        self.counters.calls += 1
        if call.nchunks:
            if not self._calls:
                self.last_progress = now
            self._calls.append(call)
            self._queued_chunks += call.nchunks
        return call

    def abandon(self) -> list[StreamCall]:
        """Drop every call (the job is over); returns them so the caller can fail them."""
        calls = list(self._calls)
        self._calls.clear()
        self._queued_chunks = 0
        self._busy[:] = False
        self._oldest = None
        self._outstanding = 0
        return calls

    # ---- sending -----------------------------------------------------------------------------

    def transmit_frames(self, now: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """What to send now: resends of lost chunks, a timeout's resends, then new chunks.

        Returns:
            Split bursts (header words (n, 4) int32, payloads (n, k) lanes): send each as one data
            message of two frames, both without copying. New chunks' headers are views of the
            ring and their payloads views of the caller's array (or of the ring's staging), which
            the protocol proves unchanged until the switch has them; resends are copies.
        """
        self._last_transmit = now
        out = self._resend_lost(now) + self._probe(now)
        while self._queued_chunks:
            n, cap = self._sendable(now)
            if n < cap:  # wait for a full burst's worth of free slots (results are on their way)
                break
            out.append(self._first_send(n, now))
        for heads, _ in out:
            self.counters.bursts_sent += 1
            self.counters.packets_sent += len(heads)
            self.counters.bytes_sent += len(heads) * self._packet_bytes
        return out

    def transmit(self, now: float) -> list[np.ndarray]:
        """`transmit_frames`, each burst joined into one interleaved packet array (a copy)."""
        return [join_split(heads, vals, self.k) for heads, vals in self.transmit_frames(now)]

    def _sending_call(self) -> StreamCall | None:
        """The call that holds the next chunk to first-send."""
        for call in self._calls:
            if call.sent < call.nchunks:
                return call
        return None

    def _sendable(self, now: float) -> tuple[int, int]:
        """(free slots in a row from the next chunk's, the most one burst may take from there).

        The cap is the burst size, cut at the end of the ring (a burst is one contiguous slice),
        at the end of the queued work, and, for a call sent from the caller's array, where its
        whole chunks end (a burst's payload is one slice of one array).
        """
        start = self._next_chunk % self.slots
        cap = min(self.burst, self.slots - start, self._queued_chunks)
        if self._range_end is not None:
            cap = min(cap, int(self._range_end[start]) - start)
        call = self._sending_call()
        if call is not None and call.source is not None:
            cap = min(cap, call.whole - call.sent if call.sent < call.whole
                      else call.nchunks - call.sent)
        if self._outstanding + cap > self.window:  # no room yet: answers are on their way
            return 0, cap
        busy = self._busy[start:start + cap]
        if self._hold_max > now:
            busy = busy | (self._hold_until[start:start + cap] > now)
        hit = int(busy.argmax())
        return (hit if busy[hit] else cap), cap

    def _first_send(self, n: int, now: float) -> tuple[np.ndarray, np.ndarray]:
        g0 = self._next_chunk
        start = g0 % self.slots
        ring = self._ring_heads[start:start + n]
        exps = self._exps[:n]
        call = self._sending_call()
        if call is not None and call.sent + n <= call.whole:  # straight from the caller's array
            payload = call.source[call.sent:call.sent + n]
            exps[:] = 0
            call.sent += n
            self._direct[start:start + n] = True
            spans = [(0, n, call.seq & 0xFF)]
        else:
            payload, spans = self._fill(n, exps)
            self._direct[start:start + n] = False
        self._stamp(ring, g0, start, n, exps, now, spans)
        return self._ring_words[start:start + n], payload

    def _fill(self, n: int, exps: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Fill the next n chunks' payloads into the ring's staging rows, call by call (a burst
        may span the end of one call and the start of the next). Returns the rows and, per call
        in the burst, (first row, stop row, call byte)."""
        start = self._next_chunk % self.slots
        values = self._ring_values[start:start + n]
        staged = values
        if self.lane_bits != 32:  # fills write int32: into a scratch, checked and packed below
            if self._fill_scratch is None:
                self._fill_scratch = np.zeros((self.slots, self.k), np.int32)
            values = self._fill_scratch[:n]
        done = 0
        spans = []  # (first, stop, call byte) of each call in the burst
        for call in self._calls:
            if done == n:
                break
            if call.sent == call.nchunks:
                continue
            m = min(n - done, call.nchunks - call.sent)
            first = call.sent
            returned = np.zeros(m, np.int8)
            lo = max(first - self.slots, 0)
            hi = first + m - self.slots
            if hi > lo:
                returned[m - (hi - lo):] = call.exponents[lo:hi]
            exps[done:done + m] = 0
            call.fill(first, first + m, returned, values[done:done + m], exps[done:done + m])
            call.sent += m
            spans.append((done, done + m, call.seq & 0xFF))
            done += m
        if values is not staged:
            check_lanes(values, self.lane_bits)
            staged[:] = values
        return staged, spans

    def _stamp(self, ring: np.ndarray, g0: int, start: int, n: int, exps: np.ndarray,
               now: float, spans: list[tuple[int, int, int]]) -> None:
        """Write the burst's per-packet header fields (the call byte from `spans`: rows
        [lo, hi) belong to the call of that byte) and mark its slots outstanding. Resends copy
        these ring headers, so they carry the same call byte."""
        if self._jit is not None:
            self._jit.stamp_headers(self._ring_words[start:start + n], g0, self.slots, exps)
        else:
            g = np.arange(g0, g0 + n, dtype=np.int64)
            ring["pool_index"] = (g % self.slots) | (((g // self.slots) & 1) << 15)
            ring["chunk"] = g % _CHUNK_MOD
            ring["exponent"] = exps
        calls = ring["reserved"]  # the header's call byte (packet.py), after the stamp above
        for lo, hi, byte in spans:
            calls[lo:hi] = byte
        self._busy[start:start + n] = True
        self._chunk[start:start + n] = np.arange(g0, g0 + n, dtype=np.int64)
        self._sent_at[start:start + n] = now
        self._resent[start:start + n] = False
        self._passed_at[start:start + n] = np.inf
        # Sent now, so no earlier than any outstanding chunk: only an empty pool changes the oldest.
        if self._oldest is not None and self._outstanding:
            self._oldest = min(self._oldest, now)
        else:
            self._oldest = None
        self._outstanding += n
        self._next_chunk += n
        self._queued_chunks -= n
        self.counters.chunks_sent += n

    def _resend(self, slots: np.ndarray, now: float) -> list[np.ndarray]:
        """Resend the chunks on `slots` as identical copies, oldest chunk first."""
        slots = slots[np.argsort(self._chunk[slots], kind="stable")]
        self._sent_at[slots] = now
        self._oldest = None
        self._resent[slots] = True
        self._passed_at[slots] = np.inf
        self._hold_until[slots] = self._hold_max = now + self.rto.minimum
        self.counters.retransmitted += len(slots)
        heads, vals = self._ring_words[slots], self._ring_values[slots]
        direct = np.flatnonzero(self._direct[slots])
        if len(direct):  # payloads sent from a caller's array: copy them from there
            g = self._chunk[slots[direct]]
            for call in self._calls:
                sel = (g >= call.first_chunk) & (g < call.first_chunk + call.whole)
                if sel.any():
                    vals[direct[sel]] = call.source[g[sel] - call.first_chunk]
        return [(heads[i:i + self.burst], vals[i:i + self.burst])
                for i in range(0, len(slots), self.burst)]

    def _reorder_window(self, now: float) -> tuple[float, float]:
        """How long a chunk may trail a later-sent answered one before it counts as lost:
        (judged by a chunk sent once, judged by a resent chunk).

        RACK's min RTT / 4 while no reordering was seen for REORDER_MEMORY smoothed RTTs; else,
        and always for the judgment by resent chunks (whose answers may come from another
        worker's packet, sooner than ours), at least rto_min. Before the first RTT sample, rto_min.
        """
        if self.min_rtt == np.inf:
            return self.rto.minimum, self.rto.minimum
        wide = max(self.min_rtt / 4, self.rto.minimum)
        if now - self._reordered_at <= REORDER_MEMORY * (self.rto.srtt or 0.0):
            return wide, wide
        return self.min_rtt / 4, wide

    def _resend_lost(self, now: float) -> list[np.ndarray]:
        """RACK: resend outstanding chunks sent before the latest answered one, once overdue."""
        if now < self._rack_due or not self._outstanding:
            return []
        reo, rr_reo = self._reorder_window(now)
        delay = self._rack_rtt + reo
        rr_delay = max(self._rr_rtt, self.min_rtt if self.min_rtt < np.inf else 0.0) + rr_reo
        if self._jit is not None:
            n, due = self._jit.rack_lost(self._busy, self._sent_at, self._chunk, self._resent,
                                         self._passed_at, self._rack_sent, self._rack_chunk,
                                         delay, reo, self._rr_sent, self._rr_chunk, rr_delay,
                                         now, self._lost)
            self._rack_due = float(due)
            return self._resend(self._lost[:n].copy(), now) if n else []
        t, g = self._sent_at, self._chunk
        before = self._busy & ((t < self._rack_sent) | ((t == self._rack_sent)
                                                         & (g < self._rack_chunk)))
        before_rr = self._busy & self._resent & ((t < self._rr_sent) | ((t == self._rr_sent)
                                                                        & (g < self._rr_chunk)))
        self._passed_at[before & (self._passed_at == np.inf)] = now
        due_at = np.minimum(np.where(before, np.minimum(t + delay, self._passed_at + reo), np.inf),
                            np.where(before_rr, t + rr_delay, np.inf))
        lost = due_at <= now
        waiting = (before | before_rr) & ~lost
        self._rack_due = float(due_at[waiting].min()) if waiting.any() else np.inf
        lost = np.flatnonzero(lost)
        return self._resend(lost, now) if len(lost) else []

    def _oldest_sent(self) -> float:
        """Earliest send time of an outstanding chunk; cached until the slot state next changes."""
        if self._oldest is None:
            self._oldest = (float(self._jit.oldest_sent(self._busy, self._sent_at))
                            if self._jit is not None else float(self._sent_at[self._busy].min()))
        return self._oldest

    def _timeout(self) -> float:
        """The RTO, or at a call's tail (nothing queued, at most `tail_resend` outstanding) the
        tail-loss probe's timeout on the minimum RTT (`RtoEstimator.probe_timeout`): a call's
        last chunks have no later answer to be found lost by, and they no longer wait behind
        bulk bursts, which set srtt (and, under load, rttvar: the RTO was 5-20x the minimum
        RTT at 10% loss, and a chain of lost probes made calls of 1-4 s, issue 15)."""
        if self._queued_chunks or self._outstanding > self.tail_resend or self.min_rtt == np.inf:
            return self.rto.rto
        return self.rto.probe_timeout(self.min_rtt)

    def _rto_deadline(self) -> float:
        # The timer restarts on every answer and every probe, as TCP's does on every ACK.
        return max(self._oldest_sent(), self.last_progress, self._last_probe) + self._timeout()

    def _probe(self, now: float) -> list[np.ndarray]:
        """Timeout (rule 3 of the module essay): nothing answered for the timeout (the RTO, or
        at a call's tail the probe's: `_timeout`), so resend every outstanding chunk an answer
        already passed (resent and still missing: nothing first-sent after its resend was
        answered to show it lost again), plus the oldest outstanding chunk, or every one when
        nothing is queued and at most `tail_resend` are left (a call's tail: there is no later
        answer to go by, and one probe per timeout would recover them one round trip each).
        Only chunks sent at least a timeout ago are resent."""
        if not self._outstanding or now < self._rto_deadline():
            return []
        busy = np.flatnonzero(self._busy & (self._sent_at + self._timeout() <= now))
        self.counters.timeouts += 1
        self.rto.backoff()
        self._last_probe = now
        passed = self._chunk[busy] < self._rack_chunk
        rest = busy[~passed]
        if len(rest) and (self._queued_chunks or len(rest) > self.tail_resend):
            rest = rest[[self._chunk[rest].argmin()]]  # one probe: the oldest chunk
        return self._resend(np.concatenate([busy[passed], rest]), now)

    def next_deadline(self) -> float | None:
        """When `transmit` next has something to do without new input (None: nothing pending)."""
        deadlines = []
        if self._outstanding:
            # -inf means "look at the next transmit": report a time already past, never -inf.
            deadlines += [self._rto_deadline(), max(self._rack_due, self.last_progress)]
        if self._queued_chunks and self._hold_max > self._last_transmit:  # a held slot may block
            held = self._hold_until[self._hold_until > self._last_transmit]
            if len(held):
                deadlines.append(float(held.min()))
        return min(deadlines) if deadlines else None

    # ---- receiving ---------------------------------------------------------------------------

    def receive(self, frame, now: float) -> list[StreamCall]:
        """Take one received data frame (a burst of RESULT/RESULT_RETX packets).

        Args:
            frame: the frame's bytes (any buffer).
            now: the current time, seconds.

        Returns:
            Calls that this frame completed, in order.
        """
        c = self.counters
        packets, trailing = parse_burst(frame, self.k, self.lane_bits)
        c.bursts_received += 1
        c.bytes_received += packets.nbytes + trailing
        c.packets_received += len(packets) + (1 if trailing else 0)
        if trailing:
            c.malformed["truncated"] = c.malformed.get("truncated", 0) + 1
        if not len(packets):
            return []
        words = packets.view(np.int32).reshape(len(packets),
                                               HEADER_WORDS + self.k * self.lane_bits // 32)
        return self._take(packets, words[:, :HEADER_WORDS],
                          words[:, HEADER_WORDS:].view(self._lanes), now)

    def receive_split(self, heads_frame, vals_frame, now: float) -> list[StreamCall]:
        """Take one received split data message (header frame, payload frame) of results.

        Args:
            heads_frame, vals_frame: the two frames' bytes (any buffers).
            now: the current time, seconds.

        Returns:
            Calls that this message completed, in order.
        """
        c = self.counters
        heads, vals, bad = parse_split(heads_frame, vals_frame, self.k, self.lane_bits)
        c.bursts_received += 1
        c.bytes_received += memoryview(heads_frame).nbytes + memoryview(vals_frame).nbytes
        if bad:
            c.packets_received += 1
            c.malformed[bad] = c.malformed.get(bad, 0) + 1
            return []
        c.packets_received += len(heads)
        if not len(heads):
            return []
        return self._take(None, heads, vals, now)

    def _take(self, packets: np.ndarray | None, heads: np.ndarray, vals: np.ndarray,
              now: float) -> list[StreamCall]:
        """Match a received burst (structured `packets`, or None for a split one, and its header
        words and values) to the outstanding chunks; returns the calls it completed."""
        c = self.counters
        matched = -1
        if self._jit is not None:
            matched = self._receive_compiled(heads, vals, now)
        if matched < 0:
            if packets is None:
                packets = join_split(heads, vals, self.k)
            matched = self._receive_reference(packets, now)
        if matched:
            self._oldest = None
            self._outstanding -= matched
            c.results += matched
            self.last_progress = now
            self.rto.restore()
        completed = []
        while self._calls and self._calls[0].complete:
            completed.append(self._calls.popleft())
        return completed

    def _note_answers(self, now: float, points: np.ndarray) -> None:
        """Fold one burst's answers (`_stream_jit.take_results`' points) into the RTT estimate,
        the RACK state and the reordering memory."""
        hi_t, hi_g, rr_t, rr_g, lo_t, lo_g = points.tolist()
        if hi_t > -np.inf:  # Karn: chunks sent once only; the burst's fastest one
            rtt = now - hi_t
            self.rto.sample(rtt)
            self.min_rtt = min(self.min_rtt, rtt)
            if (lo_t, lo_g) < (self._rack_sent, self._rack_chunk):
                # Answered after a later-sent chunk: reordered, unless it was passed a while ago
                # and another worker's resend completed its slot (that takes a round trip).
                passed = self._passed_at[int(lo_g) % self.slots]
                if passed == np.inf or now - passed < self.min_rtt / 2:
                    self._reordered_at = max(self._reordered_at, now)
            if (hi_t, hi_g) > (self._rack_sent, self._rack_chunk):
                self._rack_sent, self._rack_chunk = hi_t, int(hi_g)
                self._rack_rtt = rtt
                self._rack_due = -np.inf  # look for chunks it proves lost at the next transmit
        if rr_t > -np.inf and (rr_t, rr_g) > (self._rr_sent, self._rr_chunk):
            self._rr_sent, self._rr_chunk = rr_t, int(rr_g)
            self._rr_rtt = now - rr_t
            self._rack_due = -np.inf

    def _receive_compiled(self, words: np.ndarray, vals: np.ndarray, now: float) -> int:
        """The one-pass kernel; -1 if the burst has a malformed packet (nothing changed then)."""
        # libzmq receives small messages into a shared buffer, at any byte offset: a copy (a
        # few microseconds for them) costs far less than the numpy path.
        if not words.flags.aligned:
            words = words.copy()
        if not vals.flags.aligned:
            vals = vals.copy()
        if words.flags.writeable:  # one compiled specialization: frames are read-only buffers
            words = words.view()
            words.flags.writeable = False
        if vals.flags.writeable:
            vals = vals.view()
            vals.flags.writeable = False
        head = self._calls[0] if self._calls else None
        sums, exps, lo, hi = ((head.sums, head.exponents, head.first_chunk,
                               head.first_chunk + head.nchunks) if head is not None else
                              (self._no_sums, self._no_exps, 0, 0))
        matched, dups, wrapped, in_call, n_other = self._jit.take_results(
            words, vals, self.job_id, self.slots, self._busy, self._chunk, self._sent_at,
            self._resent, sums, exps, lo, hi, self._other, self._points)
        if matched < 0:
            return -1
        c = self.counters
        c.duplicates_ignored += dups
        c.wraps += wrapped
        if head is not None:
            head.done += in_call
        if n_other:  # results of later calls (a window spanning a call boundary)
            idx = self._other[:n_other].copy()
            w2 = words[idx, 2]
            slot = (w2 & SLOT_MASK).astype(np.intp)
            exps = ((w2 >> 16) & 0xFF).astype(np.uint8).view(np.int8)
            self._scatter(vals[idx], exps, np.arange(n_other), self._chunk[slot])
        self._note_answers(now, self._points)
        return matched

    def _receive_reference(self, packets: np.ndarray, now: float) -> int:
        """The numpy path: `packet.validate_burst`, then match and scatter (the reference)."""
        c = self.counters
        ok, bad = validate_burst(packets, kind=Kind.RESULT, job=self.job_id, worker=None,
                                 slots=self.slots)
        for reason, n in bad.items():
            c.malformed[reason] = c.malformed.get(reason, 0) + n
        pool = packets["pool_index"]
        slot = (pool & SLOT_MASK).astype(np.intp)
        if bad:
            slot = np.where(ok, slot, 0)
        g = self._chunk[slot]
        match = (ok & self._busy[slot] & (packets["chunk"] == (g % _CHUNK_MOD))
                 & (((pool & VERSION_BIT) != 0) == (((g // self.slots) & 1) == 1)))
        idx = np.flatnonzero(match)
        # The same result twice in one burst (a duplicated packet): keep one. Slots strictly
        # increasing (a burst as the switch sends it) cannot repeat, and skip the sort.
        if len(idx) > 1 and not (np.diff(slot[idx]) > 0).all():
            _, first = np.unique(slot[idx], return_index=True)
            if len(first) < len(idx):
                idx = idx[np.sort(first)]
        c.duplicates_ignored += int(np.count_nonzero(ok)) - len(idx)
        if not len(idx):
            return 0
        s_idx, g_idx = slot[idx], g[idx]
        sent, resent = self._sent_at[s_idx], self._resent[s_idx]
        points = np.full(6, -np.inf)  # as `_stream_jit.take_results` gives them
        for sel, at in ((~resent, (0, 4)), (resent, (2,))):
            if sel.any():
                order = np.lexsort((g_idx[sel], sent[sel]))
                for i, pick in zip(at, (order[-1], order[0])):  # the latest, the earliest
                    points[i:i + 2] = sent[sel][pick], g_idx[sel][pick]
        self._busy[s_idx] = False
        c.wraps += int(np.count_nonzero(packets["flags"][idx] & 1))
        self._scatter(packets["values"], packets["exponent"], idx, g_idx)
        self._note_answers(now, points)
        return len(idx)

    def _scatter(self, values: np.ndarray, exponents: np.ndarray, idx: np.ndarray,
                 g_idx: np.ndarray) -> None:
        """Write accepted results (rows `idx` of a burst's values and exponents, chunks `g_idx`)
        into their calls' outputs (one copy per call touched)."""
        for call in self._calls:
            lo = call.first_chunk
            hi = lo + call.nchunks
            sel = (g_idx >= lo) & (g_idx < hi)
            if not sel.any():
                if lo > g_idx.max():
                    break
                continue
            rel = g_idx[sel] - lo
            pidx = idx[sel]
            n = len(rel)
            if (n == pidx[-1] - pidx[0] + 1 and n == rel[-1] - rel[0] + 1
                    and (n == 1 or bool((np.diff(rel) == 1).all()))):
                # The usual case: consecutive chunks in consecutive packets -> slice copies.
                p0, r0 = int(pidx[0]), int(rel[0])
                call.sums[r0:r0 + n] = values[p0:p0 + n]
                call.exponents[r0:r0 + n] = exponents[p0:p0 + n]
            else:
                call.sums[rel] = values[pidx]
                call.exponents[rel] = exponents[pidx]
            call.done += n

    # ---- diagnosis ---------------------------------------------------------------------------

    def stuck(self, limit: int = 16) -> tuple[list[int], list[int], int]:
        """The oldest outstanding chunks' (slots, versions) and how many are outstanding."""
        busy = np.flatnonzero(self._busy)
        oldest = busy[np.argsort(self._chunk[busy], kind="stable")[:limit]]
        versions = (self._chunk[oldest] // self.slots) & 1
        return oldest.tolist(), versions.tolist(), int(len(busy))

