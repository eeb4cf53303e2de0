"""The wire format: one packet layout, defined once, used by the switch and every worker.

What it owns: the byte layout of a packet (a 16-byte header and k integer lanes of 8, 16 or 32
bits, little-endian, the project's wire contract; the lane width is chosen per job at JOIN),
bursts of packets in one ZeroMQ message (interleaved in one frame, or split into a header frame
and a payload frame), and the vectorized checks a received burst must pass. What it must never
do: I/O, or any aggregation rule (that is the switch's dataplane). How it works: a burst is a
numpy structured array of `packet_dtype(k, lane_bits)`. Parsing a frame
is one `np.frombuffer` call (zero-copy); validating it is a handful of vectorized comparisons that
return a mask of good packets and a count per reason, so a malformed packet is counted and dropped,
never an exception.

    header (16 B): magic u8 | version u8 | kind u8 | flags u8 | job u16 | worker u16 |
                   pool_index u16 (bit 15 = version, bits 0..14 = slot) | exponent i8 |
                   call u8 (the dtype field is named "reserved") | chunk u32
    payload:       k x int32 lanes (default), or k x int16 / k x int8 (`lane_bits` 16 / 8)

Lanes. A job chooses its lane width at JOIN (8, 16 or 32 bits, `LANE_BITS`; 32 by default), as
it chooses k: every packet of the job then carries k lanes of that width, k * lane_bits / 8
payload bytes after the unchanged header (`packet_bytes(k, lane_bits)`). The switch adds in that
width with two's-complement wrap-around. Every function here that builds or reads a burst takes
`lane_bits` (default 32: the int32 layout, byte for byte what it was before lanes existed).
With k >= 8, a packet is always a whole number of 32-bit words, so the compiled passes keep
reading headers as words and view the payload's words as int16 or int8 lanes.

The `call` byte (the header's former reserved byte; its dtype field keeps the name "reserved" so
that existing code reads the same bytes): in DATA, the worker's all-reduce call sequence number
modulo 256 (its n-th call since JOIN, or the number its caller chose). The switch checks that
every contribution to a slot's round carries the same chunk and call (switch_emulator/_callseq.py),
so workers whose calls drift apart get an immediate error naming both numbers instead of wrong
sums. In RESULT and RESULT_RETX it is zero (checked as "bad_reserved").

A data message carries a burst in one of two layouts of the same packets: interleaved (one frame,
packet after packet) or split (a header frame of B x 16 bytes, then a payload frame of
B x k * lane_bits / 8 bytes; packet i is header i followed by payload i). The split layout lets a worker send payloads
straight from the caller's array, and the switch answer with payloads it never re-interleaves.
`parse_split` views the two frames without copying, `join_split` and `split_burst` convert.
As header words (little-endian int32), word 2 is pool_index | exponent << 16 | call << 24 and
word 3 is the chunk; both layouts carry the call byte and are checked the same way.
"""

from __future__ import annotations

import functools
from enum import IntEnum

import numpy as np

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "Kind", "FLAG_WRAPPED", "HEADER_BYTES", "DEFAULT_K", "VALID_K",
    "MIN_K", "MAX_K", "VERSION_BIT", "SLOT_MASK", "MAX_SLOTS", "MAX_WORKERS", "MAX_BURST_BYTES",
    "HEADER_DTYPE", "packet_dtype", "packet_bytes", "check_k", "pool_index", "slot_of",
    "version_of", "parse_burst", "empty_burst", "make_burst", "validate_burst", "BAD_REASONS",
    "HEADER_WORDS", "parse_split", "join_split", "split_burst", "pipe_bounds",
    "LANE_BITS", "DEFAULT_LANE_BITS", "check_lane_bits", "lane_dtype", "lane_range",
    "lane_bits_of", "payload_bytes",
]

#: First byte of every packet. Anything else is not ours (or is misaligned) and is dropped.
MAGIC = 0x5A
#: Bumped on any incompatible change of this layout.
PROTOCOL_VERSION = 1


class Kind(IntEnum):
    """What a packet is for; the switch accepts only DATA from workers."""

    DATA = 1         # worker -> switch: a contribution to (version, slot)
    RESULT = 2       # switch -> every worker of the job: the completed slot (multicast)
    RESULT_RETX = 3  # switch -> one worker: the shadow copy, answering a retransmission


#: flags bit 0: some addition into this slot wrapped around int32 (telemetry the emulator adds).
FLAG_WRAPPED = 0x01

HEADER_BYTES = 16
#: 64 int32 = 256 B of payload: what one Tofino pipeline pass aggregates (SwitchML, NSDI 2021).
DEFAULT_K = 64
#: k is a power of two; 1024 (4 KiB) bounds a packet well below a burst, 8 keeps headers <= 1/3.
MIN_K, MAX_K = 8, 1024
VALID_K = tuple(1 << e for e in range(3, 11))

#: pool_index bit 15 selects the shadow-copy set (SwitchML's "ver"); bits 0..14 are the slot.
VERSION_BIT = 0x8000
SLOT_MASK = 0x7FFF
#: 15 bits of slot index. A Tofino holds 8192 slot pairs (SwitchML's default pool); the emulator allows more.
MAX_SLOTS = SLOT_MASK + 1
#: Ranks are u16 on the wire; the emulator's seen bitmaps bound a job to this many workers
#: (SwitchML's Tofino program: 32; the emulator must serve at least 64).
MAX_WORKERS = 256
#: Largest data frame the switch accepts: 16 MiB holds 4096 packets of k = 1024. Larger bursts gain
#: nothing (each ZeroMQ message costs 70 to 95 us of CPU here, amortized from about 256 KiB up).
MAX_BURST_BYTES = 16 << 20

#: Lane widths a job may choose at JOIN (bits per value). 32 is a Tofino's adder (SwitchML);
#: 16 and 8 carry what a 16- or 8-bit integer budget needs in half or a quarter of the bytes.
LANE_BITS = (8, 16, 32)
DEFAULT_LANE_BITS = 32
_LANE_DTYPES = {8: np.dtype("i1"), 16: np.dtype("<i2"), 32: np.dtype("<i4")}

HEADER_DTYPE = np.dtype([
    ("magic", "u1"), ("version", "u1"), ("kind", "u1"), ("flags", "u1"),
    ("job", "<u2"), ("worker", "<u2"), ("pool_index", "<u2"),
    ("exponent", "i1"), ("reserved", "u1"), ("chunk", "<u4"),
])
assert HEADER_DTYPE.itemsize == HEADER_BYTES
#: The header as little-endian int32 words (what the compiled passes read and write).
HEADER_WORDS = HEADER_BYTES // 4

#: Reasons a received packet is dropped, in the order they are checked (a packet counts once,
#: under its first failing reason). "truncated" counts a trailing partial packet in a frame.
BAD_REASONS = ("truncated", "bad_magic", "bad_version", "bad_kind", "bad_reserved", "bad_job",
               "bad_worker", "bad_slot")


def check_k(k: int) -> int:
    """Return k if it is a valid packet size, else raise ValueError naming the valid ones."""
    if not isinstance(k, (int, np.integer)) or int(k) not in VALID_K:
        raise ValueError(f"k={k!r} is not a valid packet size; choose one of {VALID_K}")
    return int(k)


def check_lane_bits(lane_bits: int) -> int:
    """Return lane_bits if it is a valid lane width, else raise ValueError naming the valid ones."""
    if (not isinstance(lane_bits, (int, np.integer)) or isinstance(lane_bits, bool)
            or int(lane_bits) not in LANE_BITS):
        raise ValueError(f"lane_bits={lane_bits!r} is not a valid lane width; choose one of "
                         f"{LANE_BITS}")
    return int(lane_bits)


def lane_dtype(lane_bits: int = DEFAULT_LANE_BITS) -> np.dtype:
    """The numpy dtype of one lane: int8, int16 or int32 (little-endian)."""
    return _LANE_DTYPES[check_lane_bits(lane_bits)]


def lane_range(lane_bits: int = DEFAULT_LANE_BITS) -> tuple[int, int]:
    """(lowest, highest) value a lane holds: [-2^(b-1), 2^(b-1) - 1]."""
    b = check_lane_bits(lane_bits)
    return -(1 << (b - 1)), (1 << (b - 1)) - 1


def lane_bits_of(values: np.ndarray) -> int:
    """The lane width of an array of lanes (its dtype's itemsize in bits)."""
    return check_lane_bits(values.dtype.itemsize * 8)


@functools.cache
def packet_dtype(k: int = DEFAULT_K, lane_bits: int = DEFAULT_LANE_BITS) -> np.dtype:
    """The structured dtype of one packet with k lanes (header fields, then `values`)."""
    check_k(k)
    return np.dtype(HEADER_DTYPE.descr + [("values", lane_dtype(lane_bits).str, (k,))])


def payload_bytes(k: int = DEFAULT_K, lane_bits: int = DEFAULT_LANE_BITS) -> int:
    """Bytes of one packet's payload: k lanes of lane_bits."""
    return check_k(k) * check_lane_bits(lane_bits) // 8


def packet_bytes(k: int = DEFAULT_K, lane_bits: int = DEFAULT_LANE_BITS) -> int:
    """Size in bytes of one packet with k lanes (header + k * lane_bits / 8)."""
    return HEADER_BYTES + payload_bytes(k, lane_bits)


def pool_index(slot: np.ndarray | int, version: np.ndarray | int) -> np.ndarray | int:
    """Pack (slot, version) into the u16 pool_index field."""
    if isinstance(slot, np.ndarray) or isinstance(version, np.ndarray):
        return (np.asarray(version, np.uint16) << np.uint16(15)) | np.asarray(slot, np.uint16)
    return (int(version) << 15) | int(slot)


def slot_of(pool: np.ndarray | int) -> np.ndarray | int:
    """Slot index (bits 0..14) of a pool_index."""
    return pool & SLOT_MASK


def version_of(pool: np.ndarray | int) -> np.ndarray | int:
    """Shadow-copy set (bit 15) of a pool_index, as 0 or 1."""
    return pool >> 15


def empty_burst(n: int, k: int = DEFAULT_K, lane_bits: int = DEFAULT_LANE_BITS) -> np.ndarray:
    """A zeroed burst of n packets with the constant header fields filled in."""
    burst = np.zeros(n, packet_dtype(k, lane_bits))
    burst["magic"] = MAGIC
    burst["version"] = PROTOCOL_VERSION
    return burst


def make_burst(kind: Kind, job: int, worker: int, slots: np.ndarray, versions: np.ndarray,
               chunks: np.ndarray, values: np.ndarray, exponents: np.ndarray | int = 0,
               k: int | None = None, lane_bits: int = DEFAULT_LANE_BITS) -> np.ndarray:
    """Build a burst from column arrays (one entry per packet).

    Args:
        kind: packet kind for every packet of the burst.
        job, worker: header fields shared by the burst.
        slots, versions, chunks: per-packet header fields.
        values: (n, k) payloads (cast to the lanes: give values that fit them).
        exponents: per-packet int8 block exponents (or one for all).
        k: packet size; defaults to values.shape[1].
        lane_bits: the job's lane width (default 32).

    Returns:
        A new structured array of `packet_dtype(k)`; send it with `burst.data` (no copy).
    """
    values = np.asarray(values)
    k = values.shape[1] if k is None else k
    burst = empty_burst(len(slots), k, lane_bits)
    burst["kind"] = kind
    burst["job"] = job
    burst["worker"] = worker
    burst["pool_index"] = pool_index(np.asarray(slots), np.asarray(versions))
    burst["chunk"] = chunks
    burst["exponent"] = exponents
    burst["values"] = values
    return burst


def parse_burst(frame: bytes | memoryview | bytearray, k: int = DEFAULT_K,
                lane_bits: int = DEFAULT_LANE_BITS) -> tuple[np.ndarray, int]:
    """View a received frame as a burst of packets, without copying.

    Args:
        frame: the raw bytes of one data frame (any buffer; a zmq.Frame's `.buffer` works).
        k: the job's packet size.
        lane_bits: the job's lane width.

    Returns:
        (packets, trailing): a read-only structured array over the whole packets in the frame, and the
        number of bytes left over after them (non-zero means the burst was truncated or padded; the
        caller counts it as one "truncated" packet).
    """
    view = memoryview(frame).cast("B")
    size = packet_bytes(k, lane_bits)
    whole = len(view) // size
    return (np.frombuffer(view, packet_dtype(k, lane_bits), count=whole),
            len(view) - whole * size)


def parse_split(heads_frame, payload_frame, k: int = DEFAULT_K,
                lane_bits: int = DEFAULT_LANE_BITS) -> tuple[np.ndarray, np.ndarray, str | None]:
    """View a split data message (header frame, payload frame) as arrays, without copying.

    Args:
        heads_frame, payload_frame: the two frames' buffers.
        k: the job's packet size; lane_bits: its lane width.

    Returns:
        (heads, vals, bad): (B, 4) int32 header words and (B, k) payloads (lanes of
        `lane_dtype(lane_bits)`), read-only; `bad`
        is None, or "truncated" when the frames do not hold B whole headers and B whole payloads
        (then heads and vals are empty: the message is dropped as one truncated packet).
    """
    hb = memoryview(heads_frame).cast("B")
    vb = memoryview(payload_frame).cast("B")
    n = len(hb) // HEADER_BYTES
    lanes = lane_dtype(lane_bits)
    if len(hb) != n * HEADER_BYTES or len(vb) != n * payload_bytes(k, lane_bits):
        return np.empty((0, HEADER_WORDS), np.int32), np.empty((0, k), lanes), "truncated"
    heads = np.frombuffer(hb, "<i4").reshape(n, HEADER_WORDS)
    return heads, np.frombuffer(vb, lanes).reshape(n, k), None


def join_split(heads: np.ndarray, vals: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """The interleaved burst (a new structured array) of header words and payloads (the lane
    width is that of `vals`: int32, int16 or int8)."""
    lane_bits = lane_bits_of(vals)
    burst = np.empty(len(heads), packet_dtype(k, lane_bits))
    words = burst.view("<i4").reshape(len(heads), HEADER_WORDS + k * lane_bits // 32)
    words[:, :HEADER_WORDS] = heads
    if lane_bits == 32:
        words[:, HEADER_WORDS:] = vals
    else:
        burst["values"] = vals
    return burst


def split_burst(burst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(header words, payloads) of an interleaved burst, as new C-contiguous arrays (int32
    words; lanes of the burst's width)."""
    words = np.ascontiguousarray(burst).view("<i4").reshape(len(burst), burst.dtype.itemsize // 4)
    heads = np.ascontiguousarray(words[:, :HEADER_WORDS])
    if burst.dtype["values"].base.itemsize == 4:
        return heads, np.ascontiguousarray(words[:, HEADER_WORDS:])
    return heads, np.ascontiguousarray(burst["values"])


def pipe_bounds(slots: int, pipes: int) -> np.ndarray:
    """Where each dataplane pipe's slot range starts: pipe p owns slots [b[p], b[p + 1]).

    The ranges are contiguous and disjoint, as equal as integers allow; both the switch and the
    workers derive them from (slots, pipes), so nothing else needs to be agreed on.
    """
    return np.array([p * slots // pipes for p in range(pipes + 1)], np.int64)


def validate_burst(packets: np.ndarray, *, kind: Kind, job: int, worker: int | None,
                   slots: int) -> tuple[np.ndarray, dict[str, int]]:
    """Check every packet of a burst against the wire contract, vectorized.

    Args:
        packets: a burst from `parse_burst`.
        kind: the only kind accepted here (DATA at the switch, RESULT/RESULT_RETX at a worker is
            checked by the caller with `kind=Kind.RESULT`, which also admits RESULT_RETX).
        job: the job id the sender belongs to.
        worker: the rank the sender joined as (None: any rank is accepted, as on the worker side).
        slots: the job's number of slots; pool slots must be below it.

    Returns:
        (ok, counts): a boolean mask of packets that pass, and for each reason in `BAD_REASONS`
        that occurred, how many packets failed first on it.
    """
    checks = [
        ("bad_magic", packets["magic"] != MAGIC),
        ("bad_version", packets["version"] != PROTOCOL_VERSION),
        ("bad_kind", (packets["kind"] != kind) & ~((kind == Kind.RESULT)
                                                   & (packets["kind"] == Kind.RESULT_RETX))),
        # The byte carries the call number in DATA (see the module essay); results leave it 0.
        ("bad_reserved", packets["reserved"] != 0) if kind != Kind.DATA else None,
        ("bad_job", packets["job"] != job),
        ("bad_worker", packets["worker"] != worker) if worker is not None else None,
        ("bad_slot", (packets["pool_index"] & SLOT_MASK) >= slots),
    ]
    ok = np.ones(len(packets), bool)
    counts: dict[str, int] = {}
    for entry in checks:
        if entry is None:
            continue
        reason, bad = entry
        first_fail = bad & ok
        n_bad = int(np.count_nonzero(first_fail))
        if n_bad:
            counts[reason] = n_bad
            ok &= ~bad
    return ok, counts
