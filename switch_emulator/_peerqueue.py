"""A byte bound on what the switch has queued for each peer, so a peer that does not read cannot
grow the switch's memory.

What it owns: per peer identity, the result frames handed to ZeroMQ and not yet released by it
(written to the kernel, or dropped with the connection), their bytes, and since when the peer has
been over its budget. What it must never do: send, or decide a job's fate (the server asks
`over_since` and aborts the job; a dataplane pipe, `_pipes`, keeps its own accounts and reports
such a peer to the server).

Why bytes: ZeroMQ's high-water mark counts messages, and a result burst is anywhere from 1 to 4096
packets (up to MAX_BURST_BYTES), so a peer that heartbeats but never reads held gigabytes within
the default HWM. How: each result frame is sent zero-copy with a pyzmq `MessageTracker`, which is
done once libzmq released the frame; before the next send to that peer its done frames are
forgotten. A frame that would take the peer past `budget` bytes is not sent (counted: the worker
recovers it by retransmission, as after a loss) and the peer is marked over budget; a peer that
stays over budget for the liveness timeout is not reading, and the server aborts its job with
that reason. A multicast frame is one buffer shared by every receiver: it counts against each
until all have it written (conservative). Control replies are small and rate-limited, and stay
under ZeroMQ's HWM alone.
"""

from __future__ import annotations

from collections import deque

import zmq

__all__ = ["PeerQueues", "DEFAULT_BUDGET"]

#: Bytes of results one peer may have queued: 4 windows of 8192 packets of k = 64 (2.2 MiB each)
#: with room to spare; a worker that reads keeps far less queued (its window bounds it).
DEFAULT_BUDGET = 64 << 20


class _Queue:
    __slots__ = ("frames", "bytes", "over_since")

    def __init__(self) -> None:
        self.frames: deque[tuple[zmq.MessageTracker, int]] = deque()
        self.bytes = 0
        self.over_since: float | None = None


class PeerQueues:
    """Bytes queued per peer, bounded by `budget`.

    Args:
        budget: bytes of unsent results one peer may hold.
    """

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self._queues: dict[bytes, _Queue] = {}
        self.refused = 0  # frames not sent because their peer was over budget

    def queued(self, identity: bytes) -> int:
        """Bytes still queued for `identity` (after forgetting the released frames)."""
        q = self._queues.get(identity)
        if q is None:
            return 0
        frames = q.frames
        while frames and frames[0][0].done:
            q.bytes -= frames.popleft()[1]
        return q.bytes

    def admit(self, identity: bytes, nbytes: int, now: float) -> bool:
        """May a frame of `nbytes` go to `identity` now? Marks it over budget if not."""
        q = self._queues.get(identity)
        if q is None:
            q = self._queues[identity] = _Queue()
        if self.queued(identity) + nbytes <= self.budget or not q.frames:
            q.over_since = None
            return True
        if q.over_since is None:
            q.over_since = now
        self.refused += 1
        return False

    def sent(self, identity: bytes, tracker: zmq.MessageTracker, nbytes: int) -> None:
        """Record a frame handed to ZeroMQ for `identity`."""
        q = self._queues.get(identity)
        if q is None:
            q = self._queues[identity] = _Queue()
        q.frames.append((tracker, nbytes))
        q.bytes += nbytes

    def over_since(self, identity: bytes) -> float | None:
        """Since when `identity` has been refused for being over budget (None: it is not)."""
        q = self._queues.get(identity)
        return None if q is None else q.over_since

    def forget(self, identity: bytes) -> None:
        """The peer left its job: stop accounting for it (ZeroMQ frees its pipe)."""
        self._queues.pop(identity, None)

    def idle_strangers(self, members: dict) -> list[bytes]:
        """Peers not in `members` with nothing queued any more (their accounts can go)."""
        return [i for i in list(self._queues) if i not in members and not self.queued(i)]

    def total(self) -> int:
        """Bytes queued over every peer (frames shared by several count once per peer)."""
        return sum(self.queued(identity) for identity in list(self._queues))
