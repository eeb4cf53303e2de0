"""The call check's compiled loop (numba); imported on first use by `_callseq`, whose essay
states the rule. One pass over a burst's header words: word 0 = magic | version << 8 | kind << 16,
word 1 = job | worker << 16, word 2 = pool_index | exponent << 16 | call << 24, word 3 = chunk."""

from __future__ import annotations

import numpy as np
from numba import njit

from switchagg.packet import MAGIC, PROTOCOL_VERSION, Kind

__all__ = ["check_rows"]

_HEAD0 = MAGIC | (PROTOCOL_VERSION << 8) | (int(Kind.DATA) << 16)
_LOW32 = (1 << 32) - 1


@njit(cache=True, nogil=True)
def check_rows(rows, job, worker, slots, chunk_tab, call_tab, rank_tab):
    """Index of the first packet whose call disagrees with its slot's round, else -1.

    Args:
        rows: (B, 4 + k) int32 view of the burst.
        job, worker: the sender's job id and rank (other packets are skipped: the dataplane
            drops them).
        slots: the job's pool size.
        chunk_tab, call_tab, rank_tab: (2 * slots,) per (version, slot): the round's chunk
            (-1: none yet), its call byte, and the rank that opened it; updated in place.
    """
    for i in range(rows.shape[0]):
        w0 = np.int64(rows[i, 0])
        w1 = np.int64(rows[i, 1])
        w2 = np.int64(rows[i, 2])
        if (w0 & 0xFFFFFF) != _HEAD0:
            continue
        if (w1 & 0xFFFF) != job or ((w1 >> 16) & 0xFFFF) != worker:
            continue
        slot = w2 & 0x7FFF
        if slot >= slots:
            continue
        f = ((w2 >> 15) & 1) * slots + slot
        chunk = np.int64(rows[i, 3]) & _LOW32
        call = (w2 >> 24) & 0xFF
        stored = chunk_tab[f]
        if stored == chunk:
            if call_tab[f] != call:
                return i
        elif stored < 0 or ((chunk - stored) & _LOW32) < (1 << 31):
            chunk_tab[f] = chunk
            call_tab[f] = call
            rank_tab[f] = worker
    return -1
