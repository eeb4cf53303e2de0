"""A swarm node's settings and counters: `NodeConfig` (validated) and `NodeStats`.

What it owns: the knobs of `switchagg.swarm.node.SwarmNode` with their meaning and checks, and the
counters a node keeps of what it did. What it must never do: any I/O; the node does the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from switchagg.swarm import lattice

__all__ = ["QUANTS", "NodeConfig", "NodeStats"]

QUANTS = ("lattice", "none")


@dataclass(frozen=True)
class NodeConfig:
    """How a node talks to its peers.

    Attributes:
        quant: "lattice" (models as b-bit lattice codes, decoded against the receiver's model) or
            "none" (full float32 copies).
        bits: lattice bits per coordinate: 4, 8 or 16.
        margin: the lattice radius as a multiple of the last distance seen between two models
            (larger: fewer full-copy fallbacks, coarser codes).
        timeout: seconds an interaction may wait for its peer (each step of it).
        dead_after: timeouts in a row after which a peer is skipped for the rest of the run.
        poll_ms: how often the answering thread looks at its stop flag.
    """

    quant: str = "lattice"
    bits: int = 8
    margin: float = 4.0
    timeout: float = 5.0
    dead_after: int = 3
    poll_ms: int = 50

    def validate(self) -> NodeConfig:
        """Raises ValueError naming the field and the value."""
        if self.quant not in QUANTS:
            raise ValueError(f"quant={self.quant!r}: choose one of {', '.join(QUANTS)}")
        if self.bits not in lattice.BITS:
            raise ValueError(f"quant_bits={self.bits!r}: choose one of {lattice.BITS}")
        if not self.margin > 0:
            raise ValueError(f"margin={self.margin!r} must be > 0")
        if not 0 < self.timeout <= 3600:
            raise ValueError(f"timeout={self.timeout!r} must be in (0, 3600] seconds")
        if self.dead_after < 1:
            raise ValueError(f"dead_after={self.dead_after!r} must be >= 1")
        return self


@dataclass
class NodeStats:
    """What one node did, as initiator and as responder (all counters, seconds in t_*)."""

    interactions: int = 0       # exchanges this node started that ended averaged
    served: int = 0             # exchanges it answered by averaging
    declined: int = 0           # its exchanges a peer declined (finished or expired)
    expired: int = 0            # requests it declined because they waited past their ttl
    timeouts: int = 0           # its exchanges that got no answer in time
    no_peer: int = 0            # interaction turns skipped: no live neighbour left
    bootstrap_full: int = 0     # full copies sent because no distance was known yet
    fallbacks: int = 0          # full copies sent because a lattice code failed its check
    decode_failures: int = 0    # lattice codes that failed the check here
    malformed: int = 0          # peer messages dropped as malformed
    stale: int = 0              # replies that arrived after their interaction was over
    errors: int = 0             # exceptions in the answering thread (logged, survived)
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    t_interact: float = 0.0     # this node's trainer, blocked in its own interactions
    t_latency: float = 0.0      # from begin to the averaged end, summed over `interactions`
    t_serve: float = 0.0        # the answering thread, averaging for peers
    t_quantize: float = 0.0
    t_decode: float = 0.0
    last_distance: float = float("nan")   # |x - y|_inf at the latest averaging
    dead_peers: list[int] = field(default_factory=list)
    finished_peers: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {f.name: (list(getattr(self, f.name)) if isinstance(getattr(self, f.name), list)
                         else getattr(self, f.name)) for f in fields(self)}
