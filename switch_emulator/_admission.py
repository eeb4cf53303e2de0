"""Who may create and join jobs, and how much of the switch one peer may hold.

What it owns: the switch's admission policy (its token, the join timeout, the slot and job quotas)
and the per-peer accounting behind the quotas. What it must never do: touch a socket or read a
clock; decide anything about a job's members (that is `_jobs.ControlPlane`, which asks here).

A peer is the host a JOIN came from (ZeroMQ's "Peer-Address" of the TCP connection; the connection
identity itself on ipc/inproc), not the connection: a squatter opens connections for free, hosts
cost it more. The peer that creates a job is charged its slots until the job ends. Rules:
  - a job asks for at most `max_job_slots` slots;
  - one peer's live jobs hold at most `max_peer_slots` slots, and it created at most
    `max_peer_jobs` of them;
  - with a switch token, every JOIN must carry it (and STATS shows every job only to its holders);
  - a job that has not got all its ranks `join_timeout` seconds after its creation is aborted, so
    a name or its slots cannot be held by a JOIN that never completes the job.
Each refusal is one of the JoinRejected codes, with a message that says which limit and how to
raise it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from switchagg.packet import MAX_SLOTS

__all__ = ["Policy", "PeerQuotas", "same_token"]


def same_token(given: str, expected: str) -> bool:
    """Constant-time comparison, on bytes (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Policy:
    """Admission limits; the defaults admit everything (the switch's config sets real ones)."""

    token: str = ""
    join_timeout: float = float("inf")
    max_job_slots: int = MAX_SLOTS
    max_peer_slots: int = 1 << 30
    max_peer_jobs: int = 1 << 30


@dataclass
class PeerQuotas:
    """Slots and jobs charged to each peer (the creator of each live job)."""

    policy: Policy
    slots: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)

    def refusal(self, peer: str, job: str, slots: int) -> tuple[str, str] | None:
        """Why `peer` may not create `job` with `slots` slots: (field, message), or None."""
        p = self.policy
        if slots > p.max_job_slots:
            return "slots", (f"job {job!r} asks for {slots} slots; this switch allows at most "
                             f"{p.max_job_slots} per job (--max-job-slots)")
        held, count = self.slots.get(peer, 0), self.jobs.get(peer, 0)
        if count >= p.max_peer_jobs:
            return "job", (f"{peer} already created {count} live jobs, the most one host may "
                           f"(--max-peer-jobs); end one first")
        if held + slots > p.max_peer_slots:
            return "slots", (f"jobs created from {peer} hold {held} slots; {slots} more would "
                             f"exceed the {p.max_peer_slots} one host may hold (--max-peer-slots)")
        return None

    def charge(self, peer: str, slots: int) -> None:
        self.slots[peer] = self.slots.get(peer, 0) + slots
        self.jobs[peer] = self.jobs.get(peer, 0) + 1

    def refund(self, peer: str, slots: int) -> None:
        left = self.jobs.get(peer, 0) - 1
        if left <= 0:
            self.jobs.pop(peer, None)
            self.slots.pop(peer, None)
        else:
            self.jobs[peer] = left
            self.slots[peer] = self.slots[peer] - slots
