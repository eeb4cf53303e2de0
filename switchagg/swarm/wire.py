"""The peer messages of SwarmSGD: one fixed little-endian header frame, one payload frame.

What it owns: the five message kinds, their header layout, and the validation of every field of
every message that arrives from a peer. What it must never do: any I/O (sockets live in
`node`), or let a malformed message out as anything but a `WireError` (the node counts and drops
it; it is never a crash).

Kinds (one interaction is EXCHANGE then REPLY; the other three are its detours):

| kind      | from      | payload       | meaning                                                   |
|-----------|-----------|---------------|-----------------------------------------------------------|
| EXCHANGE  | initiator | its model     | "average with me"                                         |
| REPLY     | responder | its model     | done: the responder has averaged; your turn               |
| NEED_FULL | responder | none          | your lattice code did not decode here: send a full copy   |
| RESEND    | initiator | none          | your REPLY did not decode here: send that model in full   |
| DECLINE   | responder | none          | not averaged (`reason`: finished, expired)                |

Header (48 bytes, `HEADER`):

| field    | type | meaning                                                                  |
|----------|------|--------------------------------------------------------------------------|
| magic    | u8   | `MAGIC`                                                                  |
| version  | u8   | `VERSION`                                                                |
| kind     | u8   | one of the kinds above                                                   |
| reason   | u8   | DECLINE's reason, else 0                                                 |
| sender   | u16  | the sender's rank (< world)                                              |
| world    | u16  | the number of workers the sender was started with                        |
| job      | u32  | a digest of the job name: messages of another run are refused           |
| seq      | u64  | the initiator's interaction number (replies echo it)                    |
| numel    | u64  | coordinates in the payload (the model size; 0 without payload)           |
| encoding | u8   | 0 none, 1 full fp32, 2 lattice                                           |
| bits     | u8   | lattice bits per coordinate (4, 8, 16), else 0                           |
| ttl_ms   | u16  | EXCHANGE: how long the initiator waits; a responder that could not start |
|          |      | within it declines instead of averaging alone                            |
| side     | f64  | the lattice side, else 0                                                 |
| check    | 8 B  | the lattice point's digest (the decode check), else zeros                |

The payload is the model as float32 (full) or the packed lattice codes.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from switchagg.errors import ProtocolError
from switchagg.swarm.lattice import BITS, LatticeCode, packed_size

__all__ = [
    "HEADER",
    "MAGIC",
    "VERSION",
    "Kind",
    "Message",
    "Reason",
    "WireError",
    "from_frames",
    "job_id",
    "max_frame",
    "to_frames",
]

MAGIC = 0x5A
VERSION = 1
HEADER = struct.Struct("<BBBBHHIQQBBHd8s")

_NONE, _FULL, _LATTICE = 0, 1, 2
_NO_CHECK = b"\0" * 8


class Kind(enum.IntEnum):
    EXCHANGE = 1
    REPLY = 2
    NEED_FULL = 3
    RESEND = 4
    DECLINE = 5


class Reason(enum.IntEnum):
    NONE = 0
    FINISHED = 1   # the responder finished training and no longer averages
    EXPIRED = 2    # the request waited longer than its ttl before the responder could take it


_WITH_MODEL = (Kind.EXCHANGE, Kind.REPLY)


class WireError(ProtocolError):
    """A peer message that breaks the format (`field` and `value` say where)."""


@dataclass(frozen=True)
class Message:
    """One peer message.

    Attributes:
        kind: what it is.
        sender: the sender's rank.
        seq: the interaction it belongs to (the initiator's counter).
        model: EXCHANGE and REPLY: a float32 numpy vector (full copy) or a `LatticeCode`.
        reason: DECLINE's reason.
        ttl_ms: EXCHANGE: how long the initiator will wait for the answer.
    """

    kind: Kind
    sender: int
    seq: int
    model: np.ndarray | LatticeCode | None = None
    reason: Reason = Reason.NONE
    ttl_ms: int = 0


def job_id(name: str) -> int:
    """The 32-bit job field for a job name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def max_frame(numel: int) -> int:
    """The largest frame a valid message of a run with `numel` coordinates has: the header, or
    a full float32 model (a lattice code is never larger). Sockets refuse larger frames."""
    return max(HEADER.size, 4 * int(numel))


def to_frames(msg: Message, *, job: int, world: int) -> list[bytes]:
    """The two frames of `msg` (header, payload)."""
    model = msg.model
    if isinstance(model, LatticeCode):
        encoding, bits, side, check, numel = _LATTICE, model.bits, model.side, model.check, model.numel
        payload = model.codes
    elif model is not None:
        vec = np.ascontiguousarray(model, dtype="<f4").ravel()
        encoding, bits, side, check, numel = _FULL, 0, 0.0, _NO_CHECK, vec.size
        payload = vec.tobytes()
    else:
        encoding, bits, side, check, numel, payload = _NONE, 0, 0.0, _NO_CHECK, 0, b""
    header = HEADER.pack(MAGIC, VERSION, int(msg.kind), int(msg.reason), msg.sender, world, job,
                         msg.seq, numel, encoding, bits, min(int(msg.ttl_ms), 0xFFFF), side, check)
    return [header, payload]


def _bad(field: str, value: object, why: str) -> WireError:
    return WireError(f"peer message: {field}={value!r} {why}", field=field, value=value)


def from_frames(frames: list[bytes], *, job: int, world: int, numel: int) -> Message:
    """Parse and validate one message.

    Args:
        frames: the message's frames (after any routing identity).
        job, world: this run's job field and number of workers.
        numel: this run's model size.
    Raises:
        WireError: naming the first field that is wrong.
    """
    if len(frames) != 2:
        raise _bad("frames", len(frames), "(expected 2: header, payload)")
    head, payload = bytes(frames[0]), bytes(frames[1])
    if len(head) != HEADER.size:
        raise _bad("header", len(head), f"bytes (expected {HEADER.size})")
    (magic, version, kind, reason, sender, w, j, seq, n, encoding, bits, ttl_ms, side,
     check) = HEADER.unpack(head)
    if magic != MAGIC:
        raise _bad("magic", magic, f"(expected {MAGIC:#x})")
    if version != VERSION:
        raise _bad("version", version, f"(this worker speaks {VERSION})")
    if kind not in Kind._value2member_map_:
        raise _bad("kind", kind, "is not a message kind")
    kind = Kind(kind)
    if j != job:
        raise _bad("job", j, "belongs to another job")
    if w != world:
        raise _bad("world", w, f"(this job has {world} workers)")
    if sender >= world:
        raise _bad("sender", sender, f"is not a rank of {world} workers")
    if reason not in Reason._value2member_map_ or (reason and kind != Kind.DECLINE):
        raise _bad("reason", reason, f"is not valid for {kind.name}")
    if kind not in _WITH_MODEL:
        if encoding != _NONE or n or payload:
            raise _bad("payload", len(payload), f"bytes on a {kind.name} (expected none)")
        return Message(kind, sender, seq, reason=Reason(reason), ttl_ms=ttl_ms)
    if n != numel:
        raise _bad("numel", n, f"(this job's models have {numel} coordinates)")
    if encoding == _FULL:
        if len(payload) != 4 * numel:
            raise _bad("payload", len(payload), f"bytes (a full model is {4 * numel})")
        model = np.frombuffer(payload, dtype="<f4")
        if not np.all(np.isfinite(model)):
            raise _bad("payload", "non-finite", "values in a full model")
        return Message(kind, sender, seq, model=model, ttl_ms=ttl_ms)
    if encoding != _LATTICE:
        raise _bad("encoding", encoding, "(expected 1 full or 2 lattice)")
    if bits not in BITS:
        raise _bad("bits", bits, f"(lattice bits are {BITS})")
    if not (np.isfinite(side) and side > 0):
        raise _bad("side", side, "(must be finite and > 0)")
    if len(payload) != packed_size(numel, bits):
        raise _bad("payload", len(payload), f"bytes ({numel} codes of {bits} bits are "
                                            f"{packed_size(numel, bits)})")
    return Message(kind, sender, seq, model=LatticeCode(bits, side, numel, payload, check),
                   ttl_ms=ttl_ms)
