"""Control messages and ZeroMQ framing, shared by the switch and the workers.

What it owns: the control plane's messages (JOIN, JOIN_OK, READY, LEAVE, HEARTBEAT, HEARTBEAT_ACK,
STATS, STATS_REPLY, QUERY, QUERY_REPLY, ERROR, ABORT), their encoding, and the two-frame layout of
every ZeroMQ message. What it must never do: I/O, or decide anything (the switch's control plane and
the client decide). How it works: every message on the worker's DEALER socket is two frames,
`[FRAME_DATA, burst]` (or `[FRAME_DATA, header words, payloads]`, packet.py's split layout) or
`[FRAME_CONTROL, json]` (the switch's ROUTER prepends the peer identity).
Control messages are frozen dataclasses validated when built, so a message that exists is valid;
`decode_control` turns a peer's bytes into one or raises `ProtocolError` naming the field, after
`_limits.load_json` has bounded the frame's size, nesting and numbers (a peer's bytes never reach
`json` unchecked, and identifiers are printable ASCII).

Exchange (packets: switchagg/packet.py):
    worker                                switch
    JOIN(job, world_size, k, slots, ...,   ->
         lane_bits)
                                        <- JOIN_OK(job_id, rank, ..., incarnation, lane_bits)
                                           | ERROR(field, reason)
                                        <- READY(job_id)               once all world_size joined
    DATA bursts                         <-> RESULT / RESULT_RETX bursts
    HEARTBEAT (every heartbeat_interval) -> HEARTBEAT_ACK(incarnation: another one = restarted)
    QUERY(slots)                        <- QUERY_REPLY(missing ranks per slot)
    STATS(token, summary)               <- STATS_REPLY(counters; jobs: members' own, or all
                                           with the switch token; none with summary)
    LEAVE                               ->
                                        <- ABORT(reason, rank)         a worker died / the switch stops
With `--pipes P > 1`, JOIN_OK also names P dataplane endpoints; the worker greets each with
PIPE_HELLO(job_id, rank, key) <- PIPE_HELLO_OK and sends each pipe the data of its slot range there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from switchagg._limits import MAX_NAME_LEN, MAX_TEXT_LEN, check_endpoint, check_name, check_text, load_json
from switchagg.errors import ProtocolError
from switchagg.packet import LANE_BITS, MAX_SLOTS, MAX_WORKERS, VALID_K

__all__ = [
    "FRAME_DATA", "FRAME_CONTROL", "MAX_CONTROL_BYTES", "MAX_REPLY_BYTES", "MAX_NAME_LEN",
    "ControlMessage", "Join",
    "JoinOk", "Ready", "Leave", "Heartbeat", "HeartbeatAck", "StatsRequest", "StatsReply", "Query",
    "QueryReply", "Error", "Abort", "PipeHello", "PipeHelloOk", "MAX_PIPES", "encode_control",
    "decode_control", "MESSAGE_TYPES",
    # The shared checks of _limits, re-exported for the switch (which imports only this module).
    "check_endpoint", "check_name", "MAX_TEXT_LEN",
]

#: Leading frame of a data message (a burst of packets follows).
FRAME_DATA = b"D"
#: Leading frame of a control message (one JSON object follows).
FRAME_CONTROL = b"C"
#: Control messages are tiny; anything larger is garbage or abuse (a QUERY of 1024 slots fits).
MAX_CONTROL_BYTES = 64 * 1024
#: What a worker accepts from the switch: a full STATS_REPLY grows with the jobs it shows (about
#: 300 B each), so it gets more room; the probe asks for a summary, which stays small.
MAX_REPLY_BYTES = 4 << 20
#: A QUERY asks about at most this many slots (the client names the stuck ones).
MAX_QUERY_SLOTS = 1024
#: Dataplane processes one switch may run (`switch-emulator --pipes`): a Tofino has 2 or 4.
MAX_PIPES = 16


def _check(cls_name: str, name: str, value: Any, kind: type | tuple, lo: Any = None,
           hi: Any = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok_type = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok_type:
        raise ProtocolError(f"{cls_name}.{name}={value!r}: expected {getattr(kind, '__name__', kind)}",
                            field=name, value=value)
    if isinstance(value, str):
        check_name(cls_name, name, value)
        return
    # NaN compares False with everything, so it would pass any bound (json.loads accepts NaN).
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{cls_name}.{name}={value!r} is not a finite number",
                            field=name, value=value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError(f"{cls_name}.{name}={value!r} is outside [{lo}, {hi}]",
                            field=name, value=value)


def _check_k(cls_name: str, k: Any) -> None:
    _check(cls_name, "k", k, int)
    if k not in VALID_K:
        raise ProtocolError(f"{cls_name}.k={k} is not one of {VALID_K}", field="k", value=k)


def _check_lane_bits(cls_name: str, lane_bits: Any, optional: bool = False) -> None:
    _check(cls_name, "lane_bits", lane_bits, int, optional=optional)
    if lane_bits is not None and lane_bits not in LANE_BITS:
        raise ProtocolError(f"{cls_name}.lane_bits={lane_bits} is not one of {LANE_BITS}",
                            field="lane_bits", value=lane_bits)


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """Base of every control message; subclasses validate their fields when built."""

    TYPE: ClassVar[str] = ""

    def validate(self) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def __post_init__(self) -> None:
        self.validate()


@dataclass(frozen=True, slots=True)
class Join(ControlMessage):
    """Ask to join `job` (created by the first JOIN; later ones must agree with it).

    `lane_bits` is the width of the job's lanes (8, 16 or 32 bits per value; packets carry k of
    them); None takes the switch's default (`switch-emulator --lane-bits`, 32 unless set).
    """

    TYPE: ClassVar[str] = "JOIN"
    job: str
    world_size: int
    k: int
    slots: int
    token: str = ""
    rank: int | None = None
    lane_bits: int | None = None

    def validate(self) -> None:
        n = "JOIN"
        check_name(n, "job", self.job, allow_empty=False)
        _check(n, "world_size", self.world_size, int, 1, MAX_WORKERS)
        _check_k(n, self.k)
        _check(n, "slots", self.slots, int, 1, MAX_SLOTS)
        _check(n, "token", self.token, str)
        _check(n, "rank", self.rank, int, 0, self.world_size - 1, optional=True)
        _check_lane_bits(n, self.lane_bits, optional=True)


@dataclass(frozen=True, slots=True)
class JoinOk(ControlMessage):
    """Admitted: the job's id on the wire, this worker's rank, and the switch's liveness rules."""

    TYPE: ClassVar[str] = "JOIN_OK"
    job: str
    job_id: int
    rank: int
    world_size: int
    k: int
    slots: int
    heartbeat_interval: float
    liveness_timeout: float
    incarnation: str = ""  # random id of this run of the switch: another one means it restarted
    # With `switch-emulator --pipes P > 1`: the P dataplane endpoints (pipe p owns slots
    # packet.pipe_bounds(slots, P)[p:p + 2] of this job) and the key this worker greets them with.
    pipes: tuple = ()
    pipe_key: str = ""
    lane_bits: int = 32  # the job's lane width (what the JOIN named, or the switch's default)

    def validate(self) -> None:
        n = "JOIN_OK"
        if not isinstance(self.pipes, (tuple, list)) or len(self.pipes) > MAX_PIPES:
            raise ProtocolError(f"JOIN_OK.pipes must be a list of at most {MAX_PIPES} endpoints",
                                field="pipes", value=str(self.pipes)[:32])
        for endpoint in self.pipes:
            _check(n, "pipes", endpoint, str)
            try:
                check_endpoint(endpoint)
            except ValueError as exc:
                raise ProtocolError(f"JOIN_OK.pipes: {exc}", field="pipes",
                                    value=endpoint[:32]) from None
        object.__setattr__(self, "pipes", tuple(self.pipes))  # JSON gives a list
        _check(n, "pipe_key", self.pipe_key, str)
        _check(n, "job", self.job, str)
        _check(n, "job_id", self.job_id, int, 0, 0xFFFF)
        _check(n, "world_size", self.world_size, int, 1, MAX_WORKERS)
        _check(n, "rank", self.rank, int, 0, self.world_size - 1)
        _check_k(n, self.k)
        _check(n, "slots", self.slots, int, 1, MAX_SLOTS)
        _check(n, "heartbeat_interval", self.heartbeat_interval, (int, float), 0.001, 3600)
        _check(n, "liveness_timeout", self.liveness_timeout, (int, float), 0.001, 3600)
        _check(n, "incarnation", self.incarnation, str)
        _check_lane_bits(n, self.lane_bits)


@dataclass(frozen=True, slots=True)
class Ready(ControlMessage):
    """Every worker of the job has joined; data may flow."""

    TYPE: ClassVar[str] = "READY"
    job_id: int

    def validate(self) -> None:
        _check("READY", "job_id", self.job_id, int, 0, 0xFFFF)


@dataclass(frozen=True, slots=True)
class Leave(ControlMessage):
    """This worker is done with the job (reason non-empty: it is failing, abort the job)."""

    TYPE: ClassVar[str] = "LEAVE"
    job_id: int
    rank: int
    reason: str = ""

    def validate(self) -> None:
        _check("LEAVE", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("LEAVE", "rank", self.rank, int, 0, MAX_WORKERS - 1)
        check_text("LEAVE", "reason", self.reason)


@dataclass(frozen=True, slots=True)
class Heartbeat(ControlMessage):
    """I am alive (sent every heartbeat_interval, data or not)."""

    TYPE: ClassVar[str] = "HEARTBEAT"
    job_id: int
    rank: int

    def validate(self) -> None:
        _check("HEARTBEAT", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("HEARTBEAT", "rank", self.rank, int, 0, MAX_WORKERS - 1)


@dataclass(frozen=True, slots=True)
class HeartbeatAck(ControlMessage):
    """The switch is alive (lets a worker notice a dead switch while it waits)."""

    TYPE: ClassVar[str] = "HEARTBEAT_ACK"
    job_id: int
    incarnation: str = ""  # as in JOIN_OK: a worker that sees another one knows the switch restarted

    def validate(self) -> None:
        _check("HEARTBEAT_ACK", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("HEARTBEAT_ACK", "incarnation", self.incarnation, str)


@dataclass(frozen=True, slots=True)
class StatsRequest(ControlMessage):
    """Ask for counters: of one job (job_id), or of the whole switch (None).

    A job's details go only to its members, or to an operator holding the switch's `token`;
    `summary` asks for the switch-wide counters alone (small whatever the number of jobs).
    """

    TYPE: ClassVar[str] = "STATS"
    job_id: int | None = None
    token: str = ""
    summary: bool = False

    def validate(self) -> None:
        _check("STATS", "job_id", self.job_id, int, 0, 0xFFFF, optional=True)
        _check("STATS", "token", self.token, str)
        _check("STATS", "summary", self.summary, bool)


@dataclass(frozen=True, slots=True)
class StatsReply(ControlMessage):
    """Counters by name (per job under "jobs", switch-wide at top level)."""

    TYPE: ClassVar[str] = "STATS_REPLY"
    stats: dict = field(default_factory=dict)

    def validate(self) -> None:
        _check("STATS_REPLY", "stats", self.stats, dict)


@dataclass(frozen=True, slots=True)
class Query(ControlMessage):
    """Which workers has the switch not heard from on these (version, slot) pairs?"""

    TYPE: ClassVar[str] = "QUERY"
    job_id: int
    slots: list = field(default_factory=list)
    versions: list = field(default_factory=list)

    def validate(self) -> None:
        _check("QUERY", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("QUERY", "slots", self.slots, list)
        _check("QUERY", "versions", self.versions, list)
        if len(self.slots) > MAX_QUERY_SLOTS or len(self.slots) != len(self.versions):
            raise ProtocolError(f"QUERY names {len(self.slots)} slots and {len(self.versions)} "
                                f"versions; they must match and be at most {MAX_QUERY_SLOTS}",
                                field="slots", value=len(self.slots))
        for s in self.slots:
            _check("QUERY", "slots", s, int, 0, MAX_SLOTS - 1)
        for v in self.versions:
            _check("QUERY", "versions", v, int, 0, 1)


@dataclass(frozen=True, slots=True)
class QueryReply(ControlMessage):
    """For each queried slot, the ranks whose contribution the switch has not seen."""

    TYPE: ClassVar[str] = "QUERY_REPLY"
    job_id: int
    missing: list = field(default_factory=list)   # one list of ranks per queried slot
    departed: list = field(default_factory=list)  # ranks that left the job

    def validate(self) -> None:
        _check("QUERY_REPLY", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("QUERY_REPLY", "missing", self.missing, list)
        _check("QUERY_REPLY", "departed", self.departed, list)
        if len(self.missing) > MAX_QUERY_SLOTS or len(self.departed) > MAX_WORKERS:
            raise ProtocolError("QUERY_REPLY lists more slots or ranks than a QUERY can ask for",
                                field="missing")
        for ranks in self.missing:
            _check("QUERY_REPLY", "missing", ranks, list)
            if len(ranks) > MAX_WORKERS:
                raise ProtocolError("QUERY_REPLY.missing lists more ranks than a job has",
                                    field="missing")
            for r in ranks:
                _check("QUERY_REPLY", "missing", r, int, 0, MAX_WORKERS - 1)
        for r in self.departed:
            _check("QUERY_REPLY", "departed", r, int, 0, MAX_WORKERS - 1)


@dataclass(frozen=True, slots=True)
class Error(ControlMessage):
    """A control message was refused; `field` names the culprit, `message` says what to do."""

    TYPE: ClassVar[str] = "ERROR"
    code: str
    message: str
    field: str | None = None
    value: Any = None

    def validate(self) -> None:
        _check("ERROR", "code", self.code, str)
        check_text("ERROR", "message", self.message)
        _check("ERROR", "field", self.field, str, optional=True)
        # The culprit's value, echoed for context: a scalar (the switch cuts strings to 64).
        if isinstance(self.value, str):
            check_text("ERROR", "value", self.value)
        elif not (self.value is None or isinstance(self.value, (bool, int))
                  or (isinstance(self.value, float) and math.isfinite(self.value))):
            raise ProtocolError("ERROR.value must be a scalar", field="value")


@dataclass(frozen=True, slots=True)
class Abort(ControlMessage):
    """The job is over for everyone: `rank` (if any) is the worker that caused it, `reason` why."""

    TYPE: ClassVar[str] = "ABORT"
    job_id: int
    reason: str
    rank: int | None = None

    def validate(self) -> None:
        _check("ABORT", "job_id", self.job_id, int, 0, 0xFFFF)
        check_text("ABORT", "reason", self.reason)
        _check("ABORT", "rank", self.rank, int, 0, MAX_WORKERS - 1, optional=True)


@dataclass(frozen=True, slots=True)
class PipeHello(ControlMessage):
    """Worker -> one dataplane pipe: this connection is `rank` of `job_id` (key from JOIN_OK)."""

    TYPE: ClassVar[str] = "PIPE_HELLO"
    job_id: int
    rank: int
    key: str

    def validate(self) -> None:
        _check("PIPE_HELLO", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("PIPE_HELLO", "rank", self.rank, int, 0, MAX_WORKERS - 1)
        _check("PIPE_HELLO", "key", self.key, str)


@dataclass(frozen=True, slots=True)
class PipeHelloOk(ControlMessage):
    """Pipe -> worker: data from this connection is now accepted as `rank` of `job_id`."""

    TYPE: ClassVar[str] = "PIPE_HELLO_OK"
    job_id: int
    rank: int

    def validate(self) -> None:
        _check("PIPE_HELLO_OK", "job_id", self.job_id, int, 0, 0xFFFF)
        _check("PIPE_HELLO_OK", "rank", self.rank, int, 0, MAX_WORKERS - 1)


#: Message classes by their wire name; an unknown name is a ProtocolError listing these.
MESSAGE_TYPES: dict[str, type[ControlMessage]] = {
    cls.TYPE: cls for cls in (Join, JoinOk, Ready, Leave, Heartbeat, HeartbeatAck, StatsRequest,
                              StatsReply, Query, QueryReply, Error, Abort, PipeHello, PipeHelloOk)
}


def encode_control(message: ControlMessage) -> bytes:
    """Serialize a control message to its JSON frame."""
    body = {"type": message.TYPE}
    body.update({f.name: getattr(message, f.name) for f in dataclasses.fields(message)})
    return json.dumps(body, separators=(",", ":")).encode()


def decode_control(frame: bytes | memoryview, max_bytes: int = MAX_CONTROL_BYTES) -> ControlMessage:
    """Parse and validate a peer's control frame.

    Args:
        frame: the frame's bytes.
        max_bytes: the largest frame accepted (the switch: MAX_CONTROL_BYTES; a worker reading the
            switch's replies: MAX_REPLY_BYTES).

    Raises:
        ProtocolError: too large, too deep, an over-long number (`_limits.load_json`), not JSON,
            not an object, unknown type, missing/unknown/invalid field; the error's `field` names
            the culprit. Nothing else: any other exception would be a bug.
    """
    body = load_json(frame, max_bytes)
    if not isinstance(body, dict):
        raise ProtocolError("control message must be a JSON object", field="body")
    name = body.pop("type", None)
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown control message type {repr(name)[:40]}; valid: "
                            f"{sorted(MESSAGE_TYPES)}", field="type",
                            value=name[:32] if isinstance(name, str) else None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - known
    if unknown:
        name0 = sorted(unknown)[0]
        raise ProtocolError(f"{cls.TYPE} has unknown field {repr(name0)[:40]}", field=name0[:32])
    try:
        return cls(**body)
    except TypeError as exc:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in body and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ProtocolError(f"{cls.TYPE} is missing field(s) {missing}: {exc}",
                            field=missing[0] if missing else None) from None
