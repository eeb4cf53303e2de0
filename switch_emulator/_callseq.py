"""The call check: every contribution to a slot's round must come from the same all-reduce call.

What it owns: per job, the (chunk, call) pair each (version, slot) round was opened with, and the
check of every DATA packet against it. What it must never do: change a packet or the dataplane's
state; decide what happens to a job whose calls are mispaired (the control plane aborts it).

Why: the switch adds whatever arrives on a slot. Workers whose calls drift apart (one skipped an
all-reduce, or called with another size) send different calls' chunks to the same slots, and the
sums come back silently wrong, or a call waits for chunks that never come. Each DATA packet
carries its call's sequence number modulo 256 in the header's `call` byte (switchagg/packet.py),
and each chunk its global index in `chunk`. Workers that make the same calls give every chunk the
same (chunk, call) pair, so the rule is exact and costs one pass over the burst's headers:
  - a packet whose chunk equals the round's: its call byte must equal the round's, else the calls
    are mispaired: the check names both ranks, the chunk and both call numbers;
  - a newer chunk on the slot (the index is ahead, modulo 2^32) opens the next round there;
  - an older one is a late copy: not checked (the dataplane treats it as the duplicate it is).
Packets the dataplane will drop (bad magic, kind, job, rank or slot) are skipped.

The check is one compiled loop over the header words where numba imports (as the dataplane's
pass), else numpy; tests hold both to the same answers. A split burst's header frame is those
words already (`check_split`), so both layouts get the same check from the same loop.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from switchagg.packet import HEADER_DTYPE, HEADER_WORDS, MAGIC, PROTOCOL_VERSION, SLOT_MASK, Kind

__all__ = ["CallCheck", "Mispaired"]

_HEAD0 = MAGIC | (PROTOCOL_VERSION << 8) | (int(Kind.DATA) << 16)
_LOW32 = (1 << 32) - 1


class Mispaired(NamedTuple):
    """Two ranks' calls met on one slot: the chunk, and each one's rank and call number."""

    chunk: int
    rank: int
    call: int
    other_rank: int
    other_call: int

    def describe(self, job: str) -> str:
        return (f"all-reduce calls of job {job!r} are mispaired: rank {self.rank} sent chunk "
                f"{self.chunk} as part of its call {self.call} (mod 256), rank {self.other_rank} "
                f"as part of its call {self.other_call}; every worker must make the same "
                "all-reduce calls, of the same sizes, in the same order (a skipped step or a "
                "different bucket layout drifts them apart)")


def _check_numpy(packets: np.ndarray, job: int, worker: int, slots: int, chunk_tab: np.ndarray,
                 call_tab: np.ndarray, rank_tab: np.ndarray) -> int:
    pool = packets["pool_index"].astype(np.int64)
    slot = pool & SLOT_MASK
    ok = ((packets["magic"] == MAGIC) & (packets["version"] == PROTOCOL_VERSION)
          & (packets["kind"] == Kind.DATA) & (packets["job"] == job)
          & (packets["worker"] == worker) & (slot < slots))
    if not ok.all():
        packets, pool, slot = packets[ok], pool[ok], slot[ok]
        index = np.flatnonzero(ok)
    else:
        index = None
    f = (pool >> 15) * slots + slot
    chunk = packets["chunk"].astype(np.int64)
    call = packets["reserved"]
    stored = chunk_tab[f]
    same = stored == chunk
    bad = np.flatnonzero(same & (call_tab[f] != call))
    # A burst is checked packet by packet in the compiled loop; here, a mismatch against the
    # table as it was before the burst, or inside the burst (two calls in one burst on one slot
    # are impossible for a well-behaved worker: one chunk per slot in flight).
    if len(bad):
        first = int(bad[0])
        return first if index is None else int(index[first])
    newer = ~same & ((stored < 0) | (((chunk - stored) & _LOW32) < (1 << 31)))
    chunk_tab[f[newer]] = chunk[newer]
    call_tab[f[newer]] = call[newer]
    rank_tab[f[newer]] = worker
    return -1


_UNLOADED = object()
_kernel: object = _UNLOADED


def _kernel_or_none():
    global _kernel
    if _kernel is _UNLOADED:
        _kernel = None
        if sys.byteorder == "little":  # the loop reads header fields as little-endian words
            try:
                from switch_emulator._callseq_jit import check_rows
            except Exception:  # noqa: BLE001 - numba missing or broken: the numpy path serves
                pass
            else:
                _kernel = check_rows
    return _kernel


class CallCheck:
    """The (chunk, call) table of one job's slot pool.

    Args:
        slots: the job's pool size.
        compiled: use the compiled loop where it loads (False: the numpy path; tests run both).
    """

    def __init__(self, slots: int, compiled: bool = True) -> None:
        self.slots = slots
        self.chunk = np.full(2 * slots, -1, np.int64)
        self.call = np.zeros(2 * slots, np.uint8)
        self.rank = np.zeros(2 * slots, np.int64)
        self._kernel = _kernel_or_none() if compiled else None

    def check(self, packets: np.ndarray, job: int, worker: int) -> Mispaired | None:
        """Check a parsed DATA burst from `worker` of job id `job`; record the rounds it opens.

        Returns:
            None if every packet agrees with its slot's round, else the first mismatch.
        """
        if not len(packets):
            return None
        i = -1
        rows = None
        if self._kernel is not None and packets.flags.c_contiguous:
            width = packets.dtype.itemsize // 4
            rows = packets.view(np.int32).reshape(len(packets), width)
            if not rows.flags.aligned:
                rows = None
        if rows is not None:
            i = int(self._kernel(rows, job, worker, self.slots, self.chunk, self.call, self.rank))
        else:
            i = _check_numpy(packets, job, worker, self.slots, self.chunk, self.call, self.rank)
        if i < 0:
            return None
        p = packets[i]
        pool = int(p["pool_index"])
        f = (pool >> 15) * self.slots + (pool & SLOT_MASK)
        return Mispaired(int(p["chunk"]), worker, int(p["reserved"]), int(self.rank[f]),
                         int(self.call[f]))

    def check_split(self, heads: np.ndarray, job: int, worker: int) -> Mispaired | None:
        """`check` for a split burst's (B, 4) int32 header words (`packet.parse_split`)."""
        if not len(heads):
            return None
        if heads.ndim != 2 or heads.shape[1] != HEADER_WORDS:
            raise ValueError(f"expected (B, {HEADER_WORDS}) header words, got {heads.shape}")
        if self._kernel is None:
            heads = np.ascontiguousarray(heads, np.int32)
            return self.check(heads.view(HEADER_DTYPE).reshape(len(heads)), job, worker)
        # The kernel reads the header words as they are (a frame's buffer: no copy, no view of
        # records), unless they sit at an odd address or are not int32.
        if heads.dtype != np.int32 or not (heads.flags.c_contiguous and heads.flags.aligned):
            heads = np.ascontiguousarray(heads, np.int32).copy()
        i = int(self._kernel(heads, job, worker, self.slots, self.chunk, self.call, self.rank))
        if i < 0:
            return None
        w2, chunk = int(heads[i, 2]), int(heads[i, 3]) & 0xFFFFFFFF
        pool = w2 & 0xFFFF
        f = (pool >> 15) * self.slots + (pool & SLOT_MASK)
        return Mispaired(chunk, worker, (w2 >> 24) & 0xFF, int(self.rank[f]), int(self.call[f]))
