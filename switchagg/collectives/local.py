"""n simulated workers in one process: the same per-worker code, rendezvousing through a barrier.

What it owns: `LocalGroup` (the shared meeting point of n workers) and `LocalCollective` (one
worker's member of it), plus `LocalGroup.run`, which runs a per-worker function on n threads. What it
must never do: share state between members other than through a collective call, or wait forever.

How it works: every collective call deposits the caller's array in its rank's slot and waits at a
`threading.Barrier`; the barrier's action (run by one thread once all n arrived) checks that every
rank called the same operation with compatible arrays, computes the result once, and a second
barrier keeps the slots intact until every rank has taken its copy. Integer sums are computed
exactly in int64, in rank order, and wrapped to int32, so wraps are counted per packet exactly as a
switch adding contributions in rank order would see them.

Accounting models the switch's wire (`switchagg.packet`): every operation ships its payload in packets of
k 4-byte words plus a 16-byte header, up and down; the emulated exponent look-ahead costs one extra
batch of min(slots, chunks) packets.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from switchagg.collectives._base import (
    Collective, chunks_wrapped, packets_for, wire_bytes, wrap_int32,
)
from switchagg.errors import JobAborted, SwitchTimeout
from switchagg.packet import DEFAULT_K

__all__ = ["LocalGroup", "LocalCollective"]

#: Default seconds a member waits for the others at each call before giving up.
DEFAULT_TIMEOUT = 60.0


class LocalGroup:
    """The meeting point of n in-process workers.

    Args:
        world_size: number of simulated workers.
        k: values per packet (accounting and look-ahead chunking).
        slots: the emulated switch's slot count (bounds the look-ahead batch).
        timeout: seconds each call waits for the other members.
    """

    def __init__(self, world_size: int, *, k: int = DEFAULT_K, slots: int = 8192,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.k = k
        self.slots = slots
        self.timeout = timeout
        self._deposits: list[Any] = [None] * world_size
        self._result: Any = None
        self._error: str | None = None
        self._arrive = threading.Barrier(world_size, action=self._reduce, timeout=timeout)
        self._leave = threading.Barrier(world_size, timeout=timeout)

    def member(self, rank: int) -> "LocalCollective":
        """The collective of worker `rank`."""
        return LocalCollective(self, rank)

    def run(self, fn: Callable[[Collective], Any], timeout: float | None = None) -> list[Any]:
        """Run fn(collective) on one thread per rank; return their results in rank order.

        Raises:
            the first exception a worker raised (others are then aborted), or SwitchTimeout.
        """
        # A failed run leaves the barriers broken; a new run starts from a clean meeting point.
        self._arrive.reset()
        self._leave.reset()
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(self.member(rank))
            except BaseException as exc:  # handed to the caller below
                errors[rank] = exc
                self._arrive.abort()
                self._leave.abort()

        threads = [threading.Thread(target=body, args=(r,), daemon=True, name=f"local-worker-{r}")
                   for r in range(self.world_size)]
        for t in threads:
            t.start()
        limit = self.timeout * 4 if timeout is None else timeout
        for t in threads:
            t.join(limit)
            if t.is_alive():
                self._arrive.abort()
                self._leave.abort()
                raise SwitchTimeout(f"local worker {t.name} still running after {limit} s")
        first = next((e for e in errors if e is not None and not isinstance(e, JobAborted)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    # -- the rendezvous -------------------------------------------------------------------------

    def _call(self, rank: int, op: str, payload: Any) -> Any:
        self._deposits[rank] = (op, payload)
        self._wait(self._arrive, rank, op)
        if self._error is not None:
            error = self._error
            self._wait(self._leave, rank, op)
            raise ValueError(error)
        result = self._result
        self._wait(self._leave, rank, op)
        return result

    def _wait(self, barrier: threading.Barrier, rank: int, op: str) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            raise JobAborted(f"local group: {op} on rank {rank} was abandoned (another worker "
                             f"failed or did not arrive within {self.timeout} s)", rank=rank) from None

    def _reduce(self) -> None:
        """Barrier action: all deposits are in; compute the one result every rank will take."""
        ops = {d[0] for d in self._deposits}
        self._error = None
        if len(ops) != 1:
            self._error = f"local group: ranks called different operations {sorted(ops)}"
            return
        op = ops.pop()
        arrays = [d[1] for d in self._deposits]
        if op == "gather":
            self._result = [a.copy() for a in arrays]
            return
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            self._error = f"local group: {op} got different lengths per rank {sorted(shapes)}"
            return
        stacked = np.stack(arrays)
        if op == "sum_int":
            prefix = np.cumsum(stacked.astype(np.int64), axis=0)  # the switch adds in arrival order
            self._result = (wrap_int32(prefix[-1]), chunks_wrapped(prefix, self.k))
        elif op == "max":
            self._result = stacked.max(axis=0)
        elif op == "sum_float":
            # Left to right in rank order, in float32, like a switch or ring adding one by one.
            total = stacked[0].copy()
            for row in stacked[1:]:
                total += row
            self._result = total
        else:  # pragma: no cover - a bug in this module
            self._error = f"local group: unknown operation {op!r}"


class LocalCollective(Collective):
    """One simulated worker of a `LocalGroup`. Build it with `group.member(rank)`."""

    kind = "local"

    def __init__(self, group: LocalGroup, rank: int) -> None:
        super().__init__(rank, group.world_size, k=group.k)
        self.group = group

    def _count(self, nbytes: int) -> None:
        packets = packets_for(nbytes, 4 * self.k)
        self.stats.packets_sent += packets
        self.stats.packets_received += packets
        self.stats.bytes_sent += wire_bytes(packets, self.k)
        self.stats.bytes_received += wire_bytes(packets, self.k)

    def _sum_int(self, values: np.ndarray) -> np.ndarray:
        self._count(values.nbytes)
        total, wraps = self.group._call(self.rank, "sum_int", values)
        self.stats.wraps += wraps
        return total.copy()

    def _max(self, values: np.ndarray) -> np.ndarray:
        self._count(values.nbytes)
        return self.group._call(self.rank, "max", values).copy()

    def _sum_float(self, values: np.ndarray) -> np.ndarray:
        self._count(values.nbytes)
        return self.group._call(self.rank, "sum_float", values).copy()

    def _gather(self, values: np.ndarray) -> list[np.ndarray]:
        self._count(values.nbytes)
        return [a.copy() for a in self.group._call(self.rank, "gather", values)]

    def _exponent_max(self, exponents: np.ndarray) -> np.ndarray:
        # Costed as the switch's exponent-only batch: min(slots, chunks) full-size packets.
        extra = min(self.group.slots, len(exponents))
        self.stats.packets_sent += extra
        self.stats.packets_received += extra
        self.stats.bytes_sent += wire_bytes(extra, self.k)
        self.stats.bytes_received += wire_bytes(extra, self.k)
        return self.group._call(self.rank, "max", exponents).copy()
