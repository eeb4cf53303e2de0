"""Results of a lossy job gathered per worker, so that its retransmission answers travel in a few
large bursts rather than many small ones.

What it owns: per receiving peer, the split results (header words, payloads) the switch has
decided to send it but not sent yet, with their job and rank. What it must never do: send, read a
clock, or hold results past the moment the server flushes (the end of each drained batch of
messages at the latest).

Why: under loss, every retransmitted burst a worker sends (a few dozen packets) completes or
answers a few slots, and the switch used to answer it at once with a message to each receiver:
at 1% loss each way, 4 workers, a 16 Mi-element all-reduce took about 1,700 result messages per
worker instead of 256, and on these machines each message costs tens of microseconds of CPU at
both ends whatever its size (the bytes are the same either way). The switch's loop handles
queued messages in batches; the small answers of up to `COALESCE_MESSAGES` handled messages for
one worker now leave as one burst, or sooner once they reach `COALESCE_PACKETS` (about 600
messages per worker then; the server sends an answer of half that size or more at once, alone,
rather than copy it into a batch). The delay this adds is bounded by handling that many
messages (a few milliseconds at most), against a retransmission timer of at least rto_min (10
ms by default) and a gap rule that waits a quarter of the minimum RTT. Lossless jobs never come
here: their results leave at once, as one zero-copy buffer shared by every receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["COALESCE_MESSAGES", "COALESCE_PACKETS", "Batch", "ResultBatches"]

#: Handled messages between two flushes of every pending batch.
COALESCE_MESSAGES = 16
#: A batch that reaches this many packets is flushed at once (a first-pass burst's results
#: usually do so alone).
COALESCE_PACKETS = 1024


@dataclass
class Batch:
    """Pending results for one peer: `job` and `rank` it was a member as, its parts in order."""

    job: object
    rank: int
    heads: list[np.ndarray] = field(default_factory=list)
    vals: list[np.ndarray] = field(default_factory=list)
    packets: int = 0

    def joined(self) -> tuple[np.ndarray, np.ndarray]:
        """(header words, payloads) of the whole batch (one part: as it is, no copy)."""
        if len(self.heads) == 1:
            return self.heads[0], self.vals[0]
        return np.concatenate(self.heads), np.concatenate(self.vals)


class ResultBatches:
    """Pending result batches, one per peer identity."""

    def __init__(self) -> None:
        self._batches: dict[bytes, Batch] = {}

    def add(self, identity: bytes, job: object, rank: int, heads: np.ndarray,
            vals: np.ndarray) -> bool:
        """Queue results for `identity`; True when its batch is full (flush it now). A peer that
        now holds another job or rank starts a new batch (the old one is dropped: its job is
        over)."""
        batch = self._batches.get(identity)
        if batch is None or batch.job is not job or batch.rank != rank:
            batch = self._batches[identity] = Batch(job, rank)
        batch.heads.append(heads)
        batch.vals.append(vals)
        batch.packets += len(heads)
        return batch.packets >= COALESCE_PACKETS

    def pop(self, identity: bytes) -> Batch | None:
        return self._batches.pop(identity, None)

    def identities(self) -> list[bytes]:
        """Peers with a pending batch (a snapshot: safe to pop while iterating)."""
        return list(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def clear(self) -> None:
        self._batches.clear()
