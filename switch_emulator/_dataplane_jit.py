"""The dataplane's compiled pass: a whole burst, one packet after the other, in one numba call.

What it owns: `receive_rows`, the golden model's rules (`_golden.py`, its essay) applied to a
burst in input order, fused with the wire checks of `switchagg.packet.validate_burst` and with
building the result packets; `warm_up`, which loads (or compiles) it. What it must never do: differ
from the golden model or from `validate_burst` (tests/test_dataplane.py compares all three on random
bursts), be imported by `import switch_emulator` (it imports numba, about 0.5 s; `_dataplane`
imports it on first use), close over per-process objects (numba's on-disk cache keys a function by its
module-level qualified name: closures miss it in every process), or touch memory out of bounds
(numba does not check indices, so every index into the state is checked here first).

How it works. A burst is viewed as rows of int32 words, one row per packet: the header's four
words (`heads`) and the k lanes (`vals`), either two column ranges of one interleaved frame (16 +
k * lane_bits / 8 bytes per packet; the lanes' columns viewed as int8 or int16 where narrower)
or the two frames of a split one (DESIGN §4 packets, carried as a header frame
and a payload frame). Little-endian header fields are bit fields of those words, so nothing is
parsed. For each packet, in input order:
  0. (with `check`) the header checks of `validate_burst`, in its order; a packet counts once,
     under its first failing reason, and is skipped. The slot bound is checked even without
     `check`, because an out-of-range slot would write outside the state: it is counted as
     "bad_slot" and skipped, and the caller treats that as its own bug.
  1. seen bitmap of the sender (one plane, (2s,) bool): a set bit is a retransmission, answered
     with the shadow copy (RESULT_RETX, into `uc_*`) if the slot is complete, else dropped. Otherwise
     set it, and clear the bit of the other version of the same slot.
  2. worker count: a complete slot starts a new round (count 0); count += 1.
  3. exponent max: the first contribution writes, later ones keep the max.
  4. write or add: the first contribution copies its values; later ones add in int64 and store the
     lane's low bits (two's complement wrap-around at the lane width, as the switch's adder),
     noting a wrap when the stored lane differs from the int64 sum. The lane width is the dtype
     of `values`, `vals` and the outputs (int32, int16 or int8: one specialization each), so one
     loop serves every width. LLVM vectorizes this loop.
  5. when count reaches n, the result (header echo, kind RESULT, flags, max exponent, reserved 0,
     the slot's values) is written to the next row of `mc_*`.
Sequential order makes every burst exact, repeated slots included: a result is copied out the
moment it is produced, before a later packet of the same burst can start a new round on its slot.
So there is no fallback and no per-step cost; a burst costs one pass over its bytes.

Counters go to `stats` (int64), indexed by the `S_*` constants below; the caller adds them to its
`DataplaneCounters` and its malformed-packet counts.

Where the cache lives: `__pycache__` beside this file, or NUMBA_CACHE_DIR if set. Where neither (nor
numba's per-user cache folder) is writable, numba refuses `cache=True`: then this module warns and
compiles in memory at every start (correct, only seconds slower to start).
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit

from switchagg.packet import FLAG_WRAPPED, MAGIC, PROTOCOL_VERSION, Kind

__all__ = ["receive_rows", "warm_up", "STAT_NAMES", "S_PACKETS_IN", "S_CONTRIBUTIONS",
           "S_COMPLETIONS", "S_DUPLICATES", "S_RETX", "S_WRAPS", "S_MULTICAST", "S_UNICAST",
           "S_BAD", "BAD_NAMES"]

# Indices into `stats`; the first six are DataplaneCounters' fields, the bad ones BAD_REASONS'.
S_PACKETS_IN, S_CONTRIBUTIONS, S_COMPLETIONS, S_DUPLICATES, S_RETX, S_WRAPS = range(6)
S_MULTICAST, S_UNICAST = 6, 7      # rows written to mc and uc
S_BAD = 8                          # S_BAD + i: packets that failed first on BAD_NAMES[i]
BAD_NAMES = ("bad_magic", "bad_version", "bad_kind", "bad_reserved", "bad_job", "bad_worker",
             "bad_slot")
STAT_NAMES = ("packets_in", "contributions", "completions", "duplicates_dropped",
              "retransmissions_answered", "wraps", "multicast", "unicast") + BAD_NAMES
_BAD_SLOT = S_BAD + 6

# Globals are frozen into the compiled code as constants.
_MAGIC, _VERSION, _DATA = MAGIC, PROTOCOL_VERSION, int(Kind.DATA)
_RESULT, _RESULT_RETX, _WRAPPED = int(Kind.RESULT), int(Kind.RESULT_RETX), FLAG_WRAPPED


_uncached: list[str] = []  # functions compiled without the on-disk cache (warned about once)


def _njit(fn):
    """njit with the on-disk cache where numba can find a writable folder for it, else without."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        if not _uncached:
            warnings.warn(f"{exc}; compiling the switch's dataplane in memory at every start "
                          "(seconds; set NUMBA_CACHE_DIR to a writable folder to keep it)",
                          RuntimeWarning, stacklevel=2)
        _uncached.append(fn.__name__)
        return njit(nogil=True)(fn)


@_njit
def _emit(out_h, out_v, row, src, kind, f, values, exponent, wrapped, k):
    """Write a result into row `row` of (out_h, out_v): the header of request `src` (its 4 header
    words) with the slot f's fields, and the slot's values."""
    flags = _WRAPPED if wrapped[f] else 0
    out_h[row, 0] = (src[0] & 0xFFFF) | (kind << 16) | (flags << 24)  # magic, version kept
    out_h[row, 1] = src[1]                                            # job, worker
    out_h[row, 2] = (src[2] & 0xFFFF) | ((np.int64(exponent[f]) & 0xFF) << 16)  # reserved 0
    out_h[row, 3] = src[3]                                            # chunk
    for j in range(k):
        out_v[row, j] = values[f, j]


@_njit
def receive_rows(heads, vals, worker, job, check, world_size, slots, values, seen_w, count,
                 exponent, wrapped, mc_h, mc_v, uc_h, uc_v, stats):
    """Apply a burst from `worker` to one job's slot pool; write its results; count.

    Args:
        heads, vals: (B, 4) int32 and (B, k) lanes (int32, int16 or int8, as `values`), the
            burst's header words and payloads (read only;
            two views of one interleaved (B, 4 + k) frame, or the two frames of a split one).
        worker: the sender's rank (its plane of the seen bitmap is `seen_w`).
        job: the job id the packets must carry (with `check`).
        check: apply `validate_burst`'s checks (kind DATA, this job, this worker); without it only
            the slot bound is checked.
        world_size, slots: n and s.
        values, seen_w, count, exponent, wrapped: the pool's state (see `_dataplane`), updated.
        mc_h, mc_v, uc_h, uc_v: (B, 4) int32 and (B, k) lane outputs: RESULT rows and RESULT_RETX
            rows (header words, values), each in input order.
        stats: (len(STAT_NAMES),) int64, zeroed by the caller; incremented here.
    """
    k = vals.shape[1]
    n_mc = 0
    n_uc = 0
    for p in range(heads.shape[0]):
        src = heads[p]
        w0, w1, w2 = np.int64(src[0]), np.int64(src[1]), np.int64(src[2])
        slot = w2 & 0x7FFF
        if check:
            bad = -1
            if (w0 & 0xFF) != _MAGIC:
                bad = 0
            elif ((w0 >> 8) & 0xFF) != _VERSION:
                bad = 1
            elif ((w0 >> 16) & 0xFF) != _DATA:
                bad = 2
            # byte 3 of word 2 is the call number (switchagg/packet.py): checked by _callseq
            elif (w1 & 0xFFFF) != job:
                bad = 4
            elif ((w1 >> 16) & 0xFFFF) != worker:
                bad = 5
            elif slot >= slots:
                bad = 6
            if bad >= 0:
                stats[S_BAD + bad] += 1
                continue
        elif slot >= slots:
            stats[_BAD_SLOT] += 1
            continue
        stats[S_PACKETS_IN] += 1
        f = ((w2 >> 15) & 1) * slots + slot
        # 1. seen bitmap.
        if seen_w[f]:
            if count[f] == world_size:
                stats[S_RETX] += 1
                _emit(uc_h, uc_v, n_uc, src, _RESULT_RETX, f, values, exponent, wrapped, k)
                n_uc += 1
            else:
                stats[S_DUPLICATES] += 1
            continue
        seen_w[f] = True
        seen_w[f - slots if f >= slots else f + slots] = False
        # 2. worker count.
        if count[f] == world_size:
            count[f] = 0
        first = count[f] == 0
        count[f] += 1
        stats[S_CONTRIBUTIONS] += 1
        # 3. exponent max (a signed byte of word 2).
        e = (w2 >> 16) & 0xFF
        if e >= 128:
            e -= 256
        # 4. write or add.
        if first:
            exponent[f] = e
            wrapped[f] = False
            for j in range(k):
                values[f, j] = vals[p, j]
        else:
            if e > exponent[f]:
                exponent[f] = e
            wraps = False
            for j in range(k):
                total = np.int64(values[f, j]) + np.int64(vals[p, j])
                values[f, j] = total  # the store keeps the lane's low bits: wraps
                wraps |= np.int64(values[f, j]) != total
            if wraps:
                wrapped[f] = True
                stats[S_WRAPS] += 1
        # 5. multicast when complete.
        if count[f] == world_size:
            stats[S_COMPLETIONS] += 1
            _emit(mc_h, mc_v, n_mc, src, _RESULT, f, values, exponent, wrapped, k)
            n_mc += 1
    stats[S_MULTICAST] = n_mc
    stats[S_UNICAST] = n_uc


def warm_up() -> None:
    """Load `receive_rows` from the cache (or compile it) with the exact types `_dataplane` passes.

    Per lane width (int32, int16, int8), two specializations: column views of one interleaved
    frame (and of interleaved outputs), and the contiguous arrays of a split frame (and of split
    outputs). A compilation takes seconds, a cache load tens of milliseconds: the switch calls
    this before it binds, so neither delays a JOIN or a liveness deadline.
    """
    k, slots, n = 8, 2, 2  # two rows: a one-row column view would pass as contiguous
    for lanes in (np.int32, np.int16, np.int8):
        width = k * np.dtype(lanes).itemsize // 4
        rows = np.zeros((n, 4 + width), np.int32)
        rows.flags.writeable = False  # frames from ZeroMQ are read-only: one specialization
        heads, vals = np.zeros((n, 4), np.int32), np.zeros((n, k), lanes)
        heads.flags.writeable = vals.flags.writeable = False
        out = np.empty((n, 4 + width), np.int32)
        oh, ov = np.empty((n, 4), np.int32), np.empty((n, k), lanes)
        for args in ((rows[:, :4], rows[:, 4:].view(lanes), out[:, :4], out[:, 4:].view(lanes),
                      out[:, :4], out[:, 4:].view(lanes)),
                     (heads, vals, oh, ov, oh, ov)):
            h, v, mc_h, mc_v, uc_h, uc_v = args
            receive_rows(h, v, 0, 0, True, 1, slots, np.zeros((2 * slots, k), lanes),
                         np.zeros(2 * slots, np.bool_), np.zeros(2 * slots, np.int32),
                         np.zeros(2 * slots, np.int8), np.zeros(2 * slots, np.bool_), mc_h, mc_v,
                         uc_h, uc_v, np.zeros(len(STAT_NAMES), np.int64))
