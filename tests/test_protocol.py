"""Tests of the control messages (switchagg/protocol.py): round trips, every field's type and
bounds, and every way a peer's frame can be malformed, each raising a ProtocolError that names the
field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from switchagg.errors import ProtocolError, SwitchError
from switchagg.packet import MAX_SLOTS, MAX_WORKERS, VALID_K
from switchagg.protocol import (MAX_CONTROL_BYTES, MAX_NAME_LEN, MAX_QUERY_SLOTS, MESSAGE_TYPES,
                                Abort, Error, Heartbeat, HeartbeatAck, Join, JoinOk, Leave,
                                PipeHello, PipeHelloOk, Query, QueryReply, Ready, StatsReply,
                                StatsRequest, decode_control, encode_control)

#: One valid instance of every message, with every field set where it has a default.
EXAMPLES = [
    Join(job="resnet", world_size=4, k=64, slots=8192, token="t0k", rank=3),
    Join(job="j", world_size=1, k=8, slots=1),
    JoinOk(job="resnet", job_id=7, rank=0, world_size=4, k=64, slots=8192,
           heartbeat_interval=0.5, liveness_timeout=5),
    JoinOk(job="resnet", job_id=7, rank=0, world_size=4, k=64, slots=8192,
           heartbeat_interval=0.5, liveness_timeout=5,
           pipes=("tcp://10.0.0.5:40001", "tcp://10.0.0.5:40002"), pipe_key="0123abcd"),
    PipeHello(job_id=7, rank=3, key="0123abcd"),
    PipeHelloOk(job_id=7, rank=3),
    Ready(job_id=0xFFFF),
    Leave(job_id=7, rank=2, reason="out of memory"),
    Heartbeat(job_id=7, rank=MAX_WORKERS - 1),
    HeartbeatAck(job_id=7),
    StatsRequest(),
    StatsRequest(job_id=3),
    StatsReply(stats={"packets_in": 10, "jobs": {"7": {"completions": 2}}}),
    Query(job_id=7, slots=[0, MAX_SLOTS - 1], versions=[0, 1]),
    QueryReply(job_id=7, missing=[[1, 2], []], departed=[3]),
    Error(code="bad_field", message="k=9 is not a power of two", field="k", value=9),
    Abort(job_id=7, reason="rank 2 timed out", rank=2),
    Abort(job_id=7, reason="switch stopping"),
]


def frame(type_name: str, **fields) -> bytes:
    return json.dumps({"type": type_name, **fields}).encode()


def body_of(message) -> dict:
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}


def reject(raw: bytes, field: str | None):
    """decode_control must raise a ProtocolError naming `field`; returns the error."""
    with pytest.raises(ProtocolError) as info:
        decode_control(raw)
    assert info.value.field == field, str(info.value)
    return info.value


# ----------------------------------------------------------------------------------------------
# round trips


def test_join_ok_pipes_are_bounded():
    ok = dict(job="j", job_id=1, rank=0, world_size=1, k=8, slots=8, heartbeat_interval=0.5,
              liveness_timeout=5)
    assert JoinOk(**ok, pipes=["tcp://h:1"] * 16).pipes == ("tcp://h:1",) * 16
    for bad in (["tcp://h:1"] * 17, "tcp://h:1", [7], ["x" * (MAX_NAME_LEN + 1)]):
        with pytest.raises(ProtocolError) as info:
            JoinOk(**ok, pipes=bad)
        assert info.value.field == "pipes"


def test_examples_cover_every_message_type():
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_decode_control_round_trips_encode_control(message):
    raw = encode_control(message)
    assert json.loads(raw)["type"] == message.TYPE
    assert decode_control(raw) == message
    assert decode_control(memoryview(raw)) == message
    assert decode_control(raw + b"  \n") == message  # trailing whitespace is still one JSON value


def test_encode_control_is_compact_json():
    raw = encode_control(Ready(job_id=1))
    assert raw == b'{"type":"READY","job_id":1}'


# ----------------------------------------------------------------------------------------------
# every field's type and bounds, through the wire (where a peer's bytes enter)


def _join(**kw):
    return dict(dict(job="j", world_size=4, k=64, slots=16), **kw)


def _join_ok(**kw):
    return dict(dict(job="j", job_id=1, rank=0, world_size=4, k=64, slots=16,
                     heartbeat_interval=1.0, liveness_timeout=5.0), **kw)


# (type, valid body, field, accepted values, rejected values)
BOUNDS = [
    ("JOIN", _join(), "world_size", [1, MAX_WORKERS],
     [0, MAX_WORKERS + 1, -1, True, 4.0, "4", None]),
    ("JOIN", _join(), "k", list(VALID_K), [4, 9, 48, 2048, True, 64.0, None]),
    ("JOIN", _join(), "slots", [1, MAX_SLOTS], [0, MAX_SLOTS + 1, False, 16.0, [16]]),
    ("JOIN", _join(), "rank", [None, 0, 3], [-1, 4, True, 1.5, "0"]),
    ("JOIN", _join(), "job", ["x", "j" * MAX_NAME_LEN], ["", "j" * (MAX_NAME_LEN + 1), 5, None]),
    ("JOIN", _join(), "token", ["", "t" * MAX_NAME_LEN], ["t" * (MAX_NAME_LEN + 1), 0, None]),
    ("JOIN_OK", _join_ok(), "job_id", [0, 0xFFFF], [-1, 0x10000, True]),
    ("JOIN_OK", _join_ok(), "k", [8, 64, 1024], [4, 9, 96, 2048, True]),
    ("JOIN_OK", _join_ok(), "rank", [0, 3], [-1, 4, False]),
    ("JOIN_OK", _join_ok(), "heartbeat_interval", [0.001, 1, 3600], [0, 0.0009, 3601, True, "1"]),
    ("JOIN_OK", _join_ok(), "liveness_timeout", [0.001, 3600.0], [0, 1e9, False, None]),
    ("READY", {"job_id": 1}, "job_id", [0, 0xFFFF], [-1, 0x10000, True, 1.0]),
    ("LEAVE", {"job_id": 1, "rank": 0}, "rank", [0, MAX_WORKERS - 1], [-1, MAX_WORKERS, True]),
    ("LEAVE", {"job_id": 1, "rank": 0}, "reason", ["", "bye"], [1, None, ["bye"]]),
    ("HEARTBEAT", {"job_id": 1, "rank": 0}, "rank", [0, MAX_WORKERS - 1], [MAX_WORKERS, True]),
    ("HEARTBEAT_ACK", {"job_id": 1}, "job_id", [0, 0xFFFF], [0x10000, False]),
    ("STATS", {}, "job_id", [None, 0, 0xFFFF], [-1, 0x10000, True, "1"]),
    ("STATS_REPLY", {}, "stats", [{}, {"a": 1}], [[], 1, None, "x"]),
    ("QUERY", {"job_id": 1}, "job_id", [0, 0xFFFF], [-1, True]),
    ("QUERY_REPLY", {"job_id": 1}, "missing", [[], [[1]]], [{}, 1, None]),
    ("QUERY_REPLY", {"job_id": 1}, "departed", [[], [1]], [{}, "1"]),
    ("ERROR", {"code": "c", "message": "m"}, "code", ["x"], [1, None]),
    ("ERROR", {"code": "c", "message": "m"}, "message", ["", "m"], [1, None]),
    ("ERROR", {"code": "c", "message": "m"}, "field", [None, "k"], [1, True]),
    ("ABORT", {"job_id": 1, "reason": "r"}, "rank", [None, 0, MAX_WORKERS - 1], [MAX_WORKERS, -1,
                                                                                  True]),
    ("ABORT", {"job_id": 1, "reason": "r"}, "reason", ["", "r"], [None, 3]),
]


@pytest.mark.parametrize("type_name,body,field,good,bad", BOUNDS,
                         ids=[f"{t}.{f}" for t, _, f, _, _ in BOUNDS])
def test_decode_control_checks_each_field(type_name, body, field, good, bad):
    for value in good:
        message = decode_control(frame(type_name, **dict(body, **{field: value})))
        assert getattr(message, field) == value
    for value in bad:
        error = reject(frame(type_name, **dict(body, **{field: value})), field)
        assert field in str(error)


@pytest.mark.parametrize("slots,versions,field", [
    ([MAX_SLOTS], [0], "slots"),               # slot out of range
    ([-1], [0], "slots"),
    ([0], [2], "versions"),                    # version is one bit
    ([0], [True], "versions"),                 # bool is not an int
    ([0, 1], [0], "slots"),                    # lengths differ
    ([0] * (MAX_QUERY_SLOTS + 1), [0] * (MAX_QUERY_SLOTS + 1), "slots"),
])
def test_decode_control_checks_query_slots(slots, versions, field):
    reject(frame("QUERY", job_id=1, slots=slots, versions=versions), field)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("name", ["heartbeat_interval", "liveness_timeout"])
def test_decode_control_rejects_non_finite_numbers(number, name):
    # json.loads accepts these; NaN would pass every bound (it compares False with anything), so a
    # NaN liveness_timeout would switch liveness off.
    raw = frame("JOIN_OK", **_join_ok(**{name: 1.5})).replace(b"1.5", number.encode())
    reject(raw, name)


def test_query_accepts_max_query_slots():
    n = MAX_QUERY_SLOTS
    message = decode_control(frame("QUERY", job_id=1, slots=list(range(n)), versions=[1] * n))
    assert len(message.slots) == n


def test_join_rank_is_bounded_by_its_own_world_size():
    assert Join(job="j", world_size=2, k=8, slots=1, rank=1).rank == 1
    with pytest.raises(ProtocolError) as info:
        Join(job="j", world_size=2, k=8, slots=1, rank=2)
    assert info.value.field == "rank" and info.value.value == 2


def test_messages_are_validated_when_built_and_frozen():
    with pytest.raises(ProtocolError):
        Heartbeat(job_id=-1, rank=0)
    message = Heartbeat(job_id=1, rank=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.rank = 5


# ----------------------------------------------------------------------------------------------
# malformed frames


def test_decode_control_unknown_type_lists_the_valid_ones():
    error = reject(frame("JOINN"), "type")
    assert str(sorted(MESSAGE_TYPES)) in str(error)
    assert error.value == "JOINN"


@pytest.mark.parametrize("raw", [b"{}", b'{"type":null}', b'{"type":5}', b'{"type":["JOIN"]}',
                                 b'{"type":"join"}'])
def test_decode_control_missing_or_invalid_type(raw):
    reject(raw, "type")


@pytest.mark.parametrize("missing", ["job", "world_size", "k", "slots"])
def test_decode_control_missing_field_names_it(missing):
    body = _join()
    del body[missing]
    error = reject(frame("JOIN", **body), missing)
    assert missing in str(error)


def test_decode_control_unknown_field_names_it():
    error = reject(frame("HEARTBEAT", job_id=1, rank=0, extra=1), "extra")
    assert "extra" in str(error)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"JOIN", b"{'type': 'READY'}",
                                 b'{"type":"READY","job_id":1}{}'])
def test_decode_control_not_json(raw):
    reject(raw, "body")


@pytest.mark.parametrize("raw", [b"[]", b'["READY", 1]', b'"READY"', b"null", b"7", b"true"])
def test_decode_control_not_an_object(raw):
    reject(raw, "body")


def test_decode_control_size_limit_at_its_edge():
    raw = frame("READY", job_id=1)
    padded = raw + b" " * (MAX_CONTROL_BYTES - len(raw))
    assert len(padded) == MAX_CONTROL_BYTES
    assert decode_control(padded) == Ready(job_id=1)
    error = reject(padded + b" ", "length")
    assert error.value == MAX_CONTROL_BYTES + 1


def test_decode_control_huge_frame_is_refused_before_parsing():
    reject(b"[" * (10 * MAX_CONTROL_BYTES), "length")


def test_protocol_error_is_a_value_error_and_a_switch_error():
    with pytest.raises(ValueError):
        decode_control(b"nope")
    assert issubclass(ProtocolError, SwitchError)
    error = ProtocolError("bad", field="k", value=9)
    assert (error.field, error.value, str(error)) == ("k", 9, "bad")
