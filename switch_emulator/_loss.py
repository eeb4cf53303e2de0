"""Seeded loss injection: drop, duplicate and reorder whole bursts of packets, vectorized.

What it owns: the emulated network's misbehaviour on one direction of one job (ingress: worker to
switch; egress: switch to each worker), and the count of what it did. What it must never do: I/O,
read a clock, or look inside packets; it only decides which records are delivered, in which order,
and how often. Every recovery path of the protocol (timeouts, retransmission, shadow copies,
duplicate suppression) runs in tests because of this module.

How it works: `apply(packets, flow)` draws three uniforms per packet from the seeded generator it was
given (so the same seed and the same traffic give the same losses) and, in one vectorized pass:
  1. drops each packet with probability `drop`;
  2. of the survivors, holds back each with probability `reorder`: held packets are delivered at the
     head of the next burst of the same flow (or by `release`, which the switch calls when it is
     idle), so they arrive after the rest of their own burst. Never later than that: a data packet
     overtaken by the worker's next burst could reach its slot after the worker moved that slot to
     the other version, and SwitchML's seen bitmap would then take a stale chunk for a new
     contribution (silently wrong sums). Real SwitchML has the same hazard and rules it out by
     bounding packet lifetime below a round trip; the emulator bounds it to one burst;
  3. of the rest, duplicates each with probability `duplicate` (the copy follows the burst).
A flow is any hashable key (the switch uses the worker's rank). Nothing is delivered that was not
sent, except the duplicates; every held packet is delivered exactly once, unless the flow is
forgotten (the job ended).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["LossRates", "LossInjector"]


@dataclass(frozen=True)
class LossRates:
    """Per-packet probabilities for one direction."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"LossRates.{name}={p!r}: expected a probability in [0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(self.drop or self.duplicate or self.reorder)


class LossInjector:
    """Drops, duplicates and reorders the bursts of one direction of one job.

    Args:
        rates: the probabilities.
        rng: a seeded `numpy.random.Generator`, owned by this injector from now on.

    Attributes:
        drops, duplicates, reorders: how many packets were dropped, duplicated, held back so far.
    """

    def __init__(self, rates: LossRates, rng: np.random.Generator) -> None:
        self.rates = rates
        self.rng = rng
        self.drops = 0
        self.duplicates = 0
        self.reorders = 0
        self._held: dict[Hashable, np.ndarray] = {}

    def apply(self, packets: np.ndarray, flow: Hashable) -> np.ndarray:
        """Pass one burst of `flow` through the emulated link.

        Args:
            packets: a burst (structured array); it is not modified.
            flow: the burst's flow key; held-back packets wait for the next burst of the same flow.

        Returns:
            The packets to deliver now, in delivery order: the packets this flow held back before,
            then the survivors of this burst, then their duplicates. `packets` itself when nothing
            changed.
        """
        earlier = self._held.pop(flow, None)
        n = len(packets)
        if n and self.rates.enabled:
            u = self.rng.random((3, n))
            keep = u[0] >= self.rates.drop
            hold = keep & (u[1] < self.rates.reorder)
            deliver = keep & ~hold
            dup = deliver & (u[2] < self.rates.duplicate)
            n_keep, n_hold, n_dup = (int(np.count_nonzero(m)) for m in (keep, hold, dup))
            self.drops += n - n_keep
            self.reorders += n_hold
            self.duplicates += n_dup
            if n_hold:
                self._held[flow] = packets[hold]
            if n_keep != n or n_hold or n_dup:
                parts = [packets[deliver]] + ([packets[dup]] if n_dup else [])
                packets = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if earlier is not None:
            packets = np.concatenate([earlier, packets]) if len(packets) else earlier
        return packets

    def release(self, flow: Hashable) -> np.ndarray | None:
        """Deliver what `flow` holds back now (None if nothing): the link has gone quiet."""
        return self._held.pop(flow, None)

    def held_flows(self) -> Iterator[Hashable]:
        """Flows that hold packets back (a snapshot; safe to `release` while iterating)."""
        return iter(list(self._held))

    def forget(self, flow: Hashable) -> None:
        """Discard what `flow` holds back (its peer is gone)."""
        self._held.pop(flow, None)

    def counters(self) -> dict[str, int]:
        return {"injected_drops": self.drops, "injected_duplicates": self.duplicates,
                "injected_reorders": self.reorders}
