"""Compiled hot loops of the worker's stream machine: one pass per received burst, one per sent one.

What it owns: the per-packet and per-slot loops of `switchagg._stream` that numpy needs several
passes and temporaries for. `take_results` validates a received RESULT burst, matches each packet to the chunk
outstanding on its slot, frees the slot, gathers what the RTT estimate and loss detection need, and
copies the values and exponents into the call's output, all in one pass over the frame.
`stamp_headers` writes the per-packet header words (pool_index, exponent, chunk) of a burst about
to be sent. `rack_lost` and `oldest_sent` scan the slot pool once for the loss-detection and
retransmission timers (numpy took about ten 8192-long passes and temporaries for them, on every
received burst). What it must never do: decide a protocol rule the numpy path does not also implement
(`_stream` keeps the numpy path as the reference and runs it whenever this module is unavailable or
a burst holds a bad packet, so reasons and counts always come from `packet.validate_burst`), be
imported before it is needed (it imports numba, about 0.5 s), or compile in the client's engine
thread (a multi-second compile there silenced heartbeats and the switch declared the worker dead:
`SwitchClient.__init__` calls `warm_up` before it joins).

How it works: a frame is viewed as (n, 4) int32 header words and (n, k) lanes (int32, int16 or
int8: the job's lane width; little-endian hosts, as the wire format; column ranges of one
interleaved frame, or a split message's two frames):
word 0 = magic | version << 8 | kind << 16 | flags << 24, word 1 = job | worker << 16,
word 2 = pool_index | exponent << 16 | reserved << 24, word 3 = chunk. Kernels are
module-level `njit(cache=True, nogil=True)` functions, so numba's on-disk cache (`__pycache__`
beside this file, or NUMBA_CACHE_DIR) serves every later process; where neither is writable numba
compiles in memory (slower to start, still correct).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from switchagg.packet import MAGIC, PROTOCOL_VERSION, Kind

__all__ = ["oldest_sent", "rack_lost", "stamp_headers", "take_results", "warm_up"]

_jit = dict(cache=True, nogil=True)

# Frozen into the compiled code as constants.
_MAGIC, _VERSION = MAGIC, PROTOCOL_VERSION
_RESULT, _RESULT_RETX = int(Kind.RESULT), int(Kind.RESULT_RETX)
_LOW32 = 0xFFFFFFFF


@njit(**_jit)
def take_results(words, vals, job, slots, busy, chunk, sent_at, resent, sums, exps, lo, hi,
                 other, points):
    """Match a RESULT burst to the outstanding chunks and copy its values out, in one pass.

    Args:
        words, vals: (n, 4) header words and (n, k) lanes of the frame (two column ranges of an
            interleaved frame, or the two frames of a split one).
        job, slots: the job id and pool size the packets must carry.
        busy, chunk, sent_at, resent: the machine's per-slot state (busy is cleared for every
            matched packet, so a second copy in the same burst counts as a duplicate).
        sums, exps: the output (nchunks, k) lanes (as `vals`) and (nchunks,) int8 of the call that
            holds chunks [lo, hi); packets of other calls are listed in `other` (packet indices).
        points: (6,) float64 output, three (send time, chunk) points of the burst, -inf where
            none: [0:2] of the latest-sent matched chunk sent once (its RTT is the burst's
            smallest unambiguous one, Karn's rule), [2:4] of the latest-resent matched chunk,
            [4:6] of the earliest-sent matched chunk sent once (reordering shows when it lies
            before an earlier burst's latest).

    Returns:
        (matched, duplicates, wrapped, in_call, n_other): matched is -1 and nothing is changed
        if any packet is malformed (the caller then runs the reference path).
    """
    n = words.shape[0]
    k = vals.shape[1]
    for i in range(n):  # validate first: a bad burst changes nothing and takes the reference path
        w0 = words[i, 0]
        w2 = words[i, 2]
        kind = (w0 >> 16) & 0xFF
        if ((w0 & 0xFF) != _MAGIC or ((w0 >> 8) & 0xFF) != _VERSION
                or (kind != _RESULT and kind != _RESULT_RETX) or ((w2 >> 24) & 0xFF) != 0
                or (words[i, 1] & 0xFFFF) != job or (w2 & 0x7FFF) >= slots):
            return -1, 0, 0, 0, 0
    matched = duplicates = wrapped = in_call = n_other = 0
    hi_t = hi_g = rr_t = rr_g = -np.inf
    lo_t = lo_g = np.inf
    for i in range(n):
        w2 = words[i, 2]
        slot = w2 & 0x7FFF
        g = chunk[slot]
        if (not busy[slot] or (words[i, 3] & _LOW32) != (g & _LOW32)
                or ((w2 >> 15) & 1) != ((g // slots) & 1)):
            duplicates += 1
            continue
        busy[slot] = False
        matched += 1
        wrapped += (words[i, 0] >> 24) & 1
        t = sent_at[slot]
        if not resent[slot]:
            if t > hi_t or (t == hi_t and g > hi_g):
                hi_t, hi_g = t, g
            if t < lo_t or (t == lo_t and g < lo_g):
                lo_t, lo_g = t, g
        elif t > rr_t or (t == rr_t and g > rr_g):
            rr_t, rr_g = t, g
        if lo <= g < hi:
            r = g - lo
            e = (w2 >> 16) & 0xFF
            exps[r] = e - 256 if e >= 128 else e
            for j in range(k):
                sums[r, j] = vals[i, j]
            in_call += 1
        else:
            other[n_other] = i
            n_other += 1
    if lo_t == np.inf:
        lo_t = lo_g = -np.inf
    points[0], points[1], points[2], points[3], points[4], points[5] = (hi_t, hi_g, rr_t, rr_g,
                                                                       lo_t, lo_g)
    return matched, duplicates, wrapped, in_call, n_other


@njit(**_jit)
def stamp_headers(words, g0, slots, exps):
    """Write word 2 (pool_index, exponent, reserved = 0) and word 3 (chunk) of chunks g0, g0+1, ...

    Args:
        words: (n, 4) int32 header words of the ring slice the burst occupies.
        g0: global index of the burst's first chunk; slots: pool size.
        exps: (n,) int8 block exponents.
    """
    for i in range(words.shape[0]):
        g = g0 + i
        pool = (g % slots) | (((g // slots) & 1) << 15)
        words[i, 2] = np.int32(pool | ((np.int64(exps[i]) & 0xFF) << 16))
        low = g & _LOW32
        words[i, 3] = np.int32(low - (1 << 32) if low >= (1 << 31) else low)


@njit(**_jit)
def rack_lost(busy, sent_at, chunk, resent, passed_at, rack_sent, rack_chunk, delay, reo,
              rr_sent, rr_chunk, rr_delay, now, lost):
    """RACK over the slot pool: outstanding chunks sent before a later-sent answered one, once
    overdue. Any chunk is judged by the latest answered chunk sent once; a resent chunk also by
    the latest answered resent chunk (whose answer proves nothing about first sends).

    Args:
        busy, sent_at, chunk, resent: the machine's per-slot state.
        passed_at: per slot, when an answer first passed its chunk (inf: not yet); set here.
        rack_sent, rack_chunk: (send time, chunk) of the latest-sent chunk sent once and answered.
        delay, reo: that answer's RTT plus the reordering window, and the window; a chunk sent
            at t before it is lost once t + delay <= now, or once it was passed reo ago (chunks
            sent together answer one after another as the switch works through them, so the
            latest answer's RTT alone would push the deadline of an early gap back and back).
        rr_sent, rr_chunk, rr_delay: the same for the latest-resent answered chunk.
        lost: (slots,) int64 scratch; the lost slots are written to its head, in slot order.

    Returns:
        (n_lost, next_due): how many slots are lost, and when the earliest chunk sent before an
        answered one that is not lost yet will be (inf if none).
    """
    n_lost = 0
    next_due = np.inf
    for s in range(busy.shape[0]):
        if not busy[s]:
            continue
        t = sent_at[s]
        g = chunk[s]
        due = np.inf
        if t < rack_sent or (t == rack_sent and g < rack_chunk):
            if passed_at[s] == np.inf:
                passed_at[s] = now
            due = min(t + delay, passed_at[s] + reo)
        if resent[s] and (t < rr_sent or (t == rr_sent and g < rr_chunk)):
            due = min(due, t + rr_delay)
        if due <= now:
            lost[n_lost] = s
            n_lost += 1
        elif due < next_due:
            next_due = due
    return n_lost, next_due


@njit(**_jit)
def oldest_sent(busy, sent_at):
    """The earliest send time of an outstanding chunk (inf if none is)."""
    oldest = np.inf
    for s in range(busy.shape[0]):
        if busy[s] and sent_at[s] < oldest:
            oldest = sent_at[s]
    return oldest


def warm_up(k: int = 8) -> None:
    """Load (or compile) every kernel for the argument types the machine passes at run time:
    interleaved frames (column views) and split ones (two contiguous arrays), of each lane
    width (int32, int16, int8: the width is known only at JOIN_OK, in the engine thread)."""
    slots = 4
    heads = np.zeros((slots, 4), np.int32)
    exps = np.zeros(slots, np.int8)
    stamp_headers(heads, 0, slots, exps)
    for lanes in (np.int32, np.int16, np.int8):
        frame = np.zeros((slots, 4 + k * np.dtype(lanes).itemsize // 4), np.int32)
        frame.flags.writeable = False  # received frames are read-only buffers
        split_h, split_v = heads.copy(), np.zeros((slots, k), lanes)
        split_h.flags.writeable = split_v.flags.writeable = False
        for h, v in ((frame[:, :4], frame[:, 4:].view(lanes)), (split_h, split_v)):
            take_results(h, v, 0, slots, np.zeros(slots, np.bool_), np.full(slots, -1, np.int64),
                         np.zeros(slots), np.zeros(slots, np.bool_), np.zeros((slots, k), lanes),
                         exps, 0, 0, np.zeros(slots, np.int64), np.zeros(6))
    busy, sent_at = np.zeros(slots, np.bool_), np.zeros(slots)
    rack_lost(busy, sent_at, np.full(slots, -1, np.int64), busy, np.zeros(slots), 0.0, 0, 0.0,
              0.0, 0.0, 0, 0.0, 0.0, np.zeros(slots, np.int64))
    oldest_sent(busy, sent_at)
