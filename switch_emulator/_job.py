"""One job of the switch: its lifecycle as data, its members and counters; and the slot pool.

What it owns: the job's state machine (JOINING -> RUNNING -> DONE / ABORTED, written as the
`TRANSITIONS` table like h11's `EVENT_TRIGGERED_TRANSITIONS`), who holds each rank, what the front
counted for the job, and `SlotPool`, which hands the switch's slots to jobs as disjoint ranges. What
it must never do: decide admission or liveness (that is `_jobs.ControlPlane`), touch a socket or read
a clock. An event missing from the table raises one `LifecycleError` naming event, state and job:
a job's state only moves forward, and a control-plane bug is loud rather than a silent state change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Protocol

import numpy as np

from switch_emulator._loss import LossInjector
from switchagg.errors import SwitchError

__all__ = ["Dataplane", "JobState", "JobEvent", "TRANSITIONS", "LifecycleError", "SlotPool",
           "Member", "JobCounters", "Job"]

class Dataplane(Protocol):
    """What the control plane needs of a dataplane (see switch_emulator._golden.GoldenDataplane)."""

    counters: Any

    def receive(self, packets: np.ndarray, worker: int) -> Any: ...

    def missing_workers(self, version: int, slot: int) -> list[int]: ...


class JobState(str, Enum):
    JOINING = "JOINING"   # created by its first JOIN; waiting for every rank
    RUNNING = "RUNNING"   # every rank joined (READY sent); data flows
    DONE = "DONE"         # every rank left gracefully; freed
    ABORTED = "ABORTED"   # a worker died, failed, or the switch stopped; freed


class JobEvent(str, Enum):
    JOIN = "join"
    ALL_JOINED = "all_joined"
    LEAVE = "leave"
    ALL_LEFT = "all_left"
    ABORT = "abort"


S, E = JobState, JobEvent
#: state -> event -> next state. DONE and ABORTED are final: no event leaves them.
TRANSITIONS: dict[JobState, dict[JobEvent, JobState]] = {
    S.JOINING: {E.JOIN: S.JOINING, E.ALL_JOINED: S.RUNNING, E.LEAVE: S.JOINING,
                E.ALL_LEFT: S.DONE, E.ABORT: S.ABORTED},
    S.RUNNING: {E.LEAVE: S.RUNNING, E.ALL_LEFT: S.DONE, E.ABORT: S.ABORTED},
    S.DONE: {},
    S.ABORTED: {},
}
del S, E


class LifecycleError(SwitchError, RuntimeError):
    """An event the job's current state does not allow (a control-plane bug, not a peer's fault).

    Attributes:
        event, state: the refused event and the state it was refused in; `job` is the job name.
    """

    def __init__(self, event: JobEvent, state: JobState, job: str) -> None:
        allowed = sorted(e.value for e in TRANSITIONS[state]) or ["none: the state is final"]
        super().__init__(f"job {job!r}: event {event.value!r} is illegal in state {state.value} "
                         f"(allowed: {', '.join(allowed)})", job=job)
        self.event = event
        self.state = state


class SlotPool:
    """The switch's slots, handed out to jobs as disjoint contiguous ranges (first fit).

    Args:
        total: number of slots of the switch.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._free: list[tuple[int, int]] = [(0, total)]  # sorted (start, length), never adjacent

    @property
    def free(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def allocate(self, n: int) -> int | None:
        """Take n contiguous slots; return the first one, or None if no free range is that large."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        """Give back a range from `allocate`, merging it with free neighbours."""
        self._free.append((start, n))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged


@dataclass
class Member:
    """One rank of a job, and the connection that holds it."""

    identity: bytes
    rank: int
    last_seen: float
    departed: bool = False
    interleaved: bool = False  # its latest data frame was one interleaved burst, not split


@dataclass
class JobCounters:
    """What the switch front counts per job (the dataplane counts the rest)."""

    packets_in: int = 0     # packets received in data frames from the job's workers, valid or not
    packets_out: int = 0    # result packets sent (a multicast to n workers counts n times)
    bursts_in: int = 0
    bursts_out: int = 0
    send_failures: int = 0  # results ZeroMQ could not queue (peer gone or its queue full)
    results_refused: int = 0  # result frames not sent: the receiver was over its byte budget
    malformed: dict[str, int] = field(default_factory=dict)  # dropped packets by reason

    def count_malformed(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.malformed[reason] = self.malformed.get(reason, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (dict(getattr(self, f.name)) if f.name == "malformed"
                         else getattr(self, f.name)) for f in fields(self)}


class Job:
    """One job: its parameters, members, lifecycle state, dataplane and counters."""

    def __init__(self, name: str, job_id: int, world_size: int, k: int, slots: int, token: str,
                 slot_base: int, dataplane: Dataplane, ingress: LossInjector | None,
                 egress: LossInjector | None, now: float, lane_bits: int = 32) -> None:
        self.name = name
        self.job_id = job_id
        self.world_size = world_size
        self.k = k
        self.lane_bits = lane_bits        # 8, 16 or 32 bits per lane, fixed at creation
        self.slots = slots
        self.token = token
        self.slot_base = slot_base        # this job's partition of the pool: [base, base + slots)
        self.dataplane = dataplane
        self.ingress = ingress            # loss injection worker -> switch (None: lossless)
        self.egress = egress              # loss injection switch -> each worker
        self.state = JobState.JOINING
        self.members: dict[int, Member] = {}
        self.counters = JobCounters()
        self.created_at = now
        self.reason = ""                  # why it was aborted
        self.creator = ""                 # the peer charged with its slots (_admission)
        self.calls: Any = None            # its call check (_callseq.CallCheck)
        self._receivers: list[Member] | None = None

    def transition(self, event: JobEvent) -> JobState:
        """Apply a lifecycle event.

        Raises:
            LifecycleError: the event is illegal in the current state (a bug in the caller).
        """
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise LifecycleError(event, self.state, self.name) from None
        return self.state

    def receivers(self) -> list[Member]:
        """Members that receive results: joined and not departed (cached; membership is rare)."""
        if self._receivers is None:
            self._receivers = [m for _, m in sorted(self.members.items()) if not m.departed]
        return self._receivers

    def membership_changed(self) -> None:
        self._receivers = None

    def free_rank(self) -> int | None:
        return next((r for r in range(self.world_size) if r not in self.members), None)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "job_id": self.job_id, "state": self.state.value,
            "world_size": self.world_size, "k": self.k, "lane_bits": self.lane_bits,
            "slots": self.slots,
            "slot_base": self.slot_base, "joined": len(self.members),
            "departed": sorted(r for r, m in self.members.items() if m.departed),
        }
        out.update(self.counters.as_dict())
        out.update(self.dataplane.counters.as_dict())
        for key in ("injected_drops", "injected_duplicates", "injected_reorders"):
            out[key] = sum(inj.counters()[key] for inj in (self.ingress, self.egress)
                           if inj is not None)
        return out
