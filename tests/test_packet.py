"""Tests of the wire format (switchagg/packet.py): layout, round trips, zero-copy parsing, every
limit at its edge, and the vectorized validation's count per reason."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from switchagg.packet import (BAD_REASONS, DEFAULT_K, FLAG_WRAPPED, HEADER_BYTES, MAGIC, MAX_K,
                              MAX_SLOTS, MAX_WORKERS, MIN_K, PROTOCOL_VERSION, SLOT_MASK, VALID_K,
                              VERSION_BIT, Kind, check_k, empty_burst, make_burst, packet_bytes,
                              packet_dtype, parse_burst, pool_index, slot_of, validate_burst,
                              version_of)

JOB, RANK, SLOTS = 3, 2, 16


def random_burst(rng, n, k, slots=SLOTS, worker=RANK, kind=Kind.DATA):
    """A valid burst of n packets with random per-packet fields."""
    return make_burst(kind, JOB, worker, rng.integers(0, slots, n), rng.integers(0, 2, n),
                      rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32),
                      rng.integers(-(1 << 31), 1 << 31, (n, k)).astype(np.int32),
                      rng.integers(-128, 128, n).astype(np.int8))


def validate(packets, **kw):
    args = dict(kind=Kind.DATA, job=JOB, worker=RANK, slots=SLOTS)
    args.update(kw)
    return validate_burst(packets, **args)


# ----------------------------------------------------------------------------------------------
# layout


def test_packet_dtype_matches_the_documented_byte_layout():
    burst = make_burst(Kind.RESULT, 0x1234, 0x0506, [0x0789], [1], [0xA1B2C3D4],
                       [[1, -1] + [0] * 6], [-3])
    burst["flags"] = FLAG_WRAPPED
    header = struct.pack("<BBBBHHHbBI", MAGIC, PROTOCOL_VERSION, Kind.RESULT, FLAG_WRAPPED, 0x1234,
                         0x0506, VERSION_BIT | 0x0789, -3, 0, 0xA1B2C3D4)
    payload = struct.pack("<8i", 1, -1, 0, 0, 0, 0, 0, 0)
    assert burst.tobytes() == header + payload
    assert len(header) == HEADER_BYTES


@pytest.mark.parametrize("k", VALID_K)
def test_packet_bytes_is_header_plus_k_int32(k):
    assert packet_bytes(k) == packet_dtype(k).itemsize == HEADER_BYTES + 4 * k


def test_empty_burst_fills_the_constant_fields():
    burst = empty_burst(3)
    assert burst.dtype == packet_dtype(DEFAULT_K)
    assert burst["magic"].tolist() == [MAGIC] * 3
    assert burst["version"].tolist() == [PROTOCOL_VERSION] * 3
    assert not burst["values"].any()


# ----------------------------------------------------------------------------------------------
# limits, each at its edge


@pytest.mark.parametrize("k", VALID_K)
def test_check_k_accepts_every_valid_k(k):
    assert check_k(k) == k and check_k(np.int64(k)) == k


@pytest.mark.parametrize("k", [MIN_K - 1, MIN_K + 1, MIN_K // 2, MAX_K - 1, MAX_K + 1, 2 * MAX_K,
                               0, -8, 48, 8.0, "8", None, True])
def test_check_k_rejects_k_outside_valid_k(k):
    with pytest.raises(ValueError, match="choose one of"):
        check_k(k)
    with pytest.raises(ValueError):
        packet_dtype(k)


def test_valid_k_spans_min_to_max_in_powers_of_two():
    assert VALID_K[0] == MIN_K == 8 and VALID_K[-1] == MAX_K == 1024
    assert all(b == 2 * a for a, b in zip(VALID_K, VALID_K[1:]))


@pytest.mark.parametrize("slot,version", [(0, 0), (0, 1), (MAX_SLOTS - 1, 0), (MAX_SLOTS - 1, 1),
                                          (SLOT_MASK, 1)])
def test_pool_index_round_trips_every_slot_and_version(slot, version):
    p = pool_index(slot, version)
    assert 0 <= p <= 0xFFFF
    assert (slot_of(p), version_of(p)) == (slot, version)
    arr = pool_index(np.array([slot]), np.array([version]))
    assert arr.dtype == np.uint16
    assert (slot_of(arr)[0], version_of(arr)[0]) == (slot, version)


def test_validate_burst_slot_edge():
    burst = make_burst(Kind.DATA, JOB, RANK, [SLOTS - 1, SLOTS, 0], [1, 1, 0], [0, 1, 2],
                       np.zeros((3, 8), np.int32))
    ok, counts = validate(burst)
    assert ok.tolist() == [True, False, True]
    assert counts == {"bad_slot": 1}


def test_validate_burst_max_slots_edge():
    burst = make_burst(Kind.DATA, JOB, RANK, [MAX_SLOTS - 1, MAX_SLOTS - 1], [0, 1], [0, 1],
                       np.zeros((2, 8), np.int32))
    ok, counts = validate(burst, slots=MAX_SLOTS)
    assert ok.all() and counts == {}
    ok, counts = validate(burst, slots=MAX_SLOTS - 1)
    assert counts == {"bad_slot": 2}


def test_validate_burst_max_workers_edge():
    top = MAX_WORKERS - 1
    burst = make_burst(Kind.DATA, JOB, top, [0], [0], [0], np.zeros((1, 8), np.int32))
    assert validate(burst, worker=top)[1] == {}
    assert validate(burst, worker=top - 1)[1] == {"bad_worker": 1}


# ----------------------------------------------------------------------------------------------
# parse_burst: round trips, zero copy, truncation; whole, in pieces, with trailing garbage


@pytest.mark.parametrize("k", VALID_K)
def test_parse_burst_round_trips_make_burst(k):
    burst = random_burst(np.random.default_rng(k), 5, k)
    packets, trailing = parse_burst(burst.tobytes(), k)
    assert trailing == 0
    assert packets.dtype == packet_dtype(k)
    assert packets.tobytes() == burst.tobytes()
    for name in packet_dtype(k).names:
        assert np.array_equal(packets[name], burst[name]), name


def test_parse_burst_is_zero_copy():
    frame = bytearray(random_burst(np.random.default_rng(0), 4, 64).tobytes())
    packets, _ = parse_burst(frame, 64)
    assert np.shares_memory(packets, np.frombuffer(frame, np.uint8))
    frame[packet_bytes(64) + 6] ^= 0xFF  # the view sees the frame change: no copy was made
    assert packets["worker"][1] == RANK ^ 0xFF


def test_parse_burst_of_bytes_is_read_only():
    packets, _ = parse_burst(random_burst(np.random.default_rng(0), 2, 8).tobytes(), 8)
    assert not packets.flags.writeable


def test_parse_burst_accepts_any_buffer():
    burst = random_burst(np.random.default_rng(1), 3, 16)
    for frame in (burst.tobytes(), bytearray(burst.tobytes()), memoryview(burst.tobytes()),
                  burst.data, burst.view(np.uint32)):
        packets, trailing = parse_burst(frame, 16)
        assert trailing == 0 and packets.tobytes() == burst.tobytes()


@pytest.mark.parametrize("cut", [1, 4, HEADER_BYTES, packet_bytes(8) - 1])
def test_parse_burst_reports_a_truncated_last_packet(cut):
    burst = random_burst(np.random.default_rng(2), 3, 8)
    frame = burst.tobytes()[:-cut]
    packets, trailing = parse_burst(frame, 8)
    assert len(packets) == 2 and trailing == packet_bytes(8) - cut
    assert packets.tobytes() == burst[:2].tobytes()


@pytest.mark.parametrize("size", [0, 1, packet_bytes(8) - 1])
def test_parse_burst_shorter_than_one_packet(size):
    packets, trailing = parse_burst(b"\x5a" * size, 8)
    assert len(packets) == 0 and trailing == size


@pytest.mark.parametrize("garbage", [b"\x00", b"\x5a" * 7, bytes(range(200))])
def test_parse_burst_with_trailing_garbage(garbage):
    burst = random_burst(np.random.default_rng(3), 4, 8)
    packets, trailing = parse_burst(burst.tobytes() + garbage, 8)
    whole, rest = divmod(len(garbage), packet_bytes(8))
    assert len(packets) == 4 + whole and trailing == rest
    assert packets[:4].tobytes() == burst.tobytes()
    ok, counts = validate(packets)
    assert ok[:4].all() and not ok[4:].any()


def reassemble(pieces, k):
    """A receiver that keeps each piece's trailing bytes and prepends them to the next piece."""
    parsed, carry = [], b""
    for piece in pieces:
        packets, trailing = parse_burst(carry + piece, k)
        parsed.append(packets)
        carry = (carry + piece)[len(carry + piece) - trailing:] if trailing else b""
    return np.concatenate(parsed), carry


@pytest.mark.parametrize("seed", range(5))
def test_parse_burst_whole_and_in_pieces_agree(seed):
    rng = np.random.default_rng(seed)
    frame = random_burst(rng, 9, 8).tobytes()
    whole, _ = parse_burst(frame, 8)
    cuts = np.sort(rng.integers(0, len(frame), int(rng.integers(1, 12))))
    pieces = [frame[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(frame)])]
    packets, carry = reassemble(pieces, 8)
    assert carry == b"" and packets.tobytes() == whole.tobytes()
    one_byte_at_a_time, carry = reassemble([frame[i:i + 1] for i in range(len(frame))], 8)
    assert carry == b"" and one_byte_at_a_time.tobytes() == whole.tobytes()


# ----------------------------------------------------------------------------------------------
# validate_burst: one count per reason, each packet under its first failing reason


CORRUPTIONS = {
    "bad_magic": lambda p: p.__setitem__("magic", MAGIC ^ 1),
    "bad_version": lambda p: p.__setitem__("version", PROTOCOL_VERSION + 1),
    "bad_kind": lambda p: p.__setitem__("kind", Kind.RESULT),
    "bad_job": lambda p: p.__setitem__("job", JOB + 1),
    "bad_worker": lambda p: p.__setitem__("worker", RANK + 1),  # rank spoofing
    "bad_slot": lambda p: p.__setitem__("pool_index", pool_index(SLOTS, 0)),
}


def test_bad_reasons_cover_every_check():
    assert set(CORRUPTIONS) | {"truncated", "bad_reserved"} == set(BAD_REASONS)


def test_call_byte_is_free_in_data_and_zero_in_results():
    burst = random_burst(np.random.default_rng(4), 10, 8)
    burst["reserved"][[1, 4, 5]] = [1, 200, 255]  # DATA: the call number, any value
    ok, counts = validate(burst)
    assert counts == {} and ok.all()
    burst["kind"] = Kind.RESULT
    ok, counts = validate_burst(burst, kind=Kind.RESULT, job=JOB, worker=None, slots=SLOTS)
    assert counts == {"bad_reserved": 3} and np.flatnonzero(~ok).tolist() == [1, 4, 5]


@pytest.mark.parametrize("reason", sorted(CORRUPTIONS))
def test_validate_burst_counts_each_reason(reason):
    burst = random_burst(np.random.default_rng(4), 10, 8)
    for i in (1, 4, 5):
        CORRUPTIONS[reason](burst[i:i + 1])
    ok, counts = validate(burst)
    assert counts == {reason: 3}
    assert np.flatnonzero(~ok).tolist() == [1, 4, 5]


def test_validate_burst_counts_a_packet_once_under_its_first_reason():
    order = [r for r in BAD_REASONS if r in CORRUPTIONS]
    burst = random_burst(np.random.default_rng(5), len(order) + 2, 8)
    # Packet i fails every check from order[i] on; it must count under order[i] alone.
    for i in range(len(order)):
        for reason in order[i:]:
            CORRUPTIONS[reason](burst[i:i + 1])
    ok, counts = validate(burst)
    assert counts == {reason: 1 for reason in order}
    assert ok.tolist() == [False] * len(order) + [True, True]
    assert sum(counts.values()) + int(ok.sum()) == len(burst)


def test_validate_burst_on_the_worker_side():
    rng = np.random.default_rng(6)
    burst = np.concatenate([random_burst(rng, 2, 8, worker=0, kind=Kind.RESULT),
                            random_burst(rng, 2, 8, worker=5, kind=Kind.RESULT_RETX),
                            random_burst(rng, 1, 8, kind=Kind.DATA)])
    ok, counts = validate(burst, kind=Kind.RESULT, worker=None)
    assert ok.tolist() == [True] * 4 + [False] and counts == {"bad_kind": 1}
    ok, counts = validate(burst)  # the switch accepts DATA only, and only from RANK
    assert counts == {"bad_kind": 4} and ok.tolist() == [False] * 4 + [True]


def test_validate_burst_of_nothing():
    ok, counts = validate(np.zeros(0, packet_dtype(8)))
    assert ok.shape == (0,) and counts == {}
