"""Reusable output buffers for the dataplane: results are written into memory ZeroMQ gave back.

What it owns: a small pool of int32 row buffers that the fast dataplane writes its RESULT and
RESULT_RETX rows into, instead of allocating (and page-faulting) fresh arrays for every burst. What
it must never do: hand out a buffer that anything still reads, whether a socket that has not yet
sent it or a caller (a test) that kept a result.

How it works: the switch sends results without copying, so libzmq keeps a reference to the
buffer (through pyzmq's zero-copy frame) until every receiver's copy has left, and a caller that
keeps a result array keeps a view of it. Either way the buffer's Python reference count stays above
the pool's own. A buffer is free again exactly when its count is back to what the pool alone
holds, so `take` scans the pool (a handful of entries) for one, and allocates only when all are in
use or too small. Buffers below pyzmq's copy threshold (64 KiB) are copied at send time and come
back at once; large ones come back once the IO thread has written them. The pool stops growing
at `MAX_BUFFERS`; past that a fresh, unpooled buffer is returned (as before this pool existed), so
a slow receiver holding many results cannot make the pool grow without bound.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["MAX_BUFFERS", "RowPool"]

#: Buffers kept per pool. The switch's loop has results of a few bursts in flight per job (one
#: send per receiver each, written out by the IO thread within a burst or two); 32 leaves room
#: for a slow receiver without keeping more than a few MiB per job.
MAX_BUFFERS = 32
#: sys.getrefcount of a buffer held only by the pool: the pool's list and getrefcount's argument.
_FREE_REFS = 2


class RowPool:
    """(rows, width) int32 buffers (or of `dtype`), reused once nothing else references them.

    Args:
        width: items per row.
        dtype: the items' dtype (default int32 words; a split payload's lanes: int16, int8).
    """

    def __init__(self, width: int, dtype=np.int32) -> None:
        self.width = width
        self.dtype = np.dtype(dtype)
        self._buffers: list[np.ndarray] = []
        self.allocated = 0  # buffers allocated in all (pooled or not), for tests and stats

    def take(self, rows: int) -> np.ndarray:
        """A (rows, width) array nobody else references (contents undefined)."""
        buffers = self._buffers
        for i in range(len(buffers)):  # not enumerate: its reused tuple holds a reference
            if sys.getrefcount(buffers[i]) == _FREE_REFS:
                if len(buffers[i]) < rows:  # too small: replace it with a larger one
                    buffers[i] = self._new(rows)
                return buffers[i][:rows]
        buf = self._new(rows)
        if len(buffers) < MAX_BUFFERS:
            buffers.append(buf)
        return buf[:rows]

    def _new(self, rows: int) -> np.ndarray:
        self.allocated += 1
        buf = np.empty((max(rows, 1), self.width), self.dtype)
        buf.fill(0)  # fault the pages in now, once, rather than on each first write
        return buf
