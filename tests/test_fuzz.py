"""Fuzz the switch's receive path: parse_burst -> validate_burst -> dataplane.receive.

Invariant: any packet is accepted or counted as bad, never an exception. For every frame,
    accepted + sum(bad counts) == whole packets + (1 if a partial packet trails)
and the dataplane sees exactly the accepted packets (its packets_in counter says so), and everything
it sends back is itself a valid RESULT or RESULT_RETX packet of the job.

Frames come from four generators: random bytes, random headers behind a valid magic byte, bit flips
of valid bursts, and valid bursts cut short. Over 100k packets go through the fast dataplane; a
smaller sample goes through the golden model as well, which must answer byte for byte the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from switch_emulator.dataplane import make_dataplane
from switchagg.packet import (MAGIC, PROTOCOL_VERSION, Kind, make_burst, packet_bytes,
                              parse_burst, validate_burst)

JOB, WORLD, SLOTS = 9, 4, 48


def random_bytes(rng, k):
    return rng.integers(0, 256, int(rng.integers(0, 300 * packet_bytes(k))), np.uint8).tobytes()


def valid_burst(rng, k, worker, n=None):
    n = int(rng.integers(1, 300)) if n is None else n
    # Slots beyond SLOTS and repeats within a burst are on purpose: the flips below move them about.
    return make_burst(Kind.DATA, JOB, worker, rng.integers(0, SLOTS, n), rng.integers(0, 2, n),
                      np.arange(n), rng.integers(-(1 << 31), 1 << 31, (n, k)).astype(np.int32),
                      rng.integers(-128, 128, n).astype(np.int8))


def random_headers(rng, k, worker):
    """Random packets behind a valid magic, with each header field right half the time."""
    raw = np.frombuffer(random_bytes(rng, k), np.uint8)
    burst = raw[:len(raw) // packet_bytes(k) * packet_bytes(k)].copy().view(valid_burst(
        rng, k, worker, 1).dtype)
    burst["magic"] = MAGIC
    n = len(burst)
    for name, good in (("version", PROTOCOL_VERSION), ("kind", Kind.DATA), ("reserved", 0),
                       ("job", JOB), ("worker", worker)):
        keep = rng.random(n) < 0.5
        burst[name] = np.where(keep, good, burst[name])
    burst["pool_index"] &= np.where(rng.random(n) < 0.5, 0x803F, 0xFFFF).astype(np.uint16)
    return burst.tobytes()


def bit_flips(rng, k, worker):
    frame = np.frombuffer(valid_burst(rng, k, worker).tobytes(), np.uint8).copy()
    bits = rng.integers(0, 8 * len(frame), int(rng.integers(1, 1 + len(frame) // 8)))
    np.bitwise_xor.at(frame, bits // 8, (1 << (bits % 8)).astype(np.uint8))
    return frame.tobytes()


def truncated(rng, k, worker):
    frame = valid_burst(rng, k, worker).tobytes()
    return frame[:int(rng.integers(0, len(frame)))]


GENERATORS = {"random_bytes": lambda rng, k, w: random_bytes(rng, k),
              "random_headers": random_headers, "bit_flips": bit_flips, "truncated": truncated}


def receive_frame(dataplanes, frame, k, worker):
    """The switch's receive path; returns (whole packets + partial, accepted, bad) for the frame."""
    packets, trailing = parse_burst(frame, k)
    ok, counts = validate_burst(packets, kind=Kind.DATA, job=JOB, worker=worker, slots=SLOTS)
    good = packets[ok]
    outputs = [dp.receive(good, worker) for dp in dataplanes]
    for out in outputs:
        for burst in (out.multicast, out.unicast):
            sent_ok, sent_bad = validate_burst(burst, kind=Kind.RESULT, job=JOB, worker=None,
                                               slots=SLOTS)
            assert sent_ok.all(), sent_bad
        assert out.multicast.tobytes() == outputs[0].multicast.tobytes()
        assert out.unicast.tobytes() == outputs[0].unicast.tobytes()
    total = len(packets) + (1 if trailing else 0)
    return total, int(ok.sum()), sum(counts.values()) + (1 if trailing else 0)


@pytest.mark.parametrize("k", [8, 64])
def test_receive_path_accepts_or_counts_every_packet(k):
    rng = np.random.default_rng(k)
    dataplane = make_dataplane("fast", WORLD, SLOTS, k)
    packets = accepted = bad = 0
    target = 100_000 if k == 8 else 20_000
    while packets < target:
        for name, generate in GENERATORS.items():
            worker = int(rng.integers(WORLD))
            total, good, wrong = receive_frame([dataplane], generate(rng, k, worker), k, worker)
            assert good + wrong == total, name
            packets, accepted, bad = packets + total, accepted + good, bad + wrong
    assert accepted + bad == packets >= target
    assert dataplane.counters.packets_in == accepted
    assert 0 < accepted < packets  # both sides of the check were exercised
    c = dataplane.counters
    assert c.contributions + c.duplicates_dropped + c.retransmissions_answered == accepted
    assert c.completions > 0 and c.retransmissions_answered > 0 and c.duplicates_dropped > 0


def test_receive_path_golden_and_fast_agree_under_fuzz():
    rng = np.random.default_rng(1)
    dataplanes = [make_dataplane(name, WORLD, SLOTS, 8) for name in ("golden", "fast")]
    packets = 0
    while packets < 5_000:
        for generate in (bit_flips, random_headers, truncated):
            worker = int(rng.integers(WORLD))
            total, good, wrong = receive_frame(dataplanes, generate(rng, 8, worker), 8, worker)
            assert good + wrong == total
            packets += total
    assert dataplanes[0].counters == dataplanes[1].counters
    assert dataplanes[0].counters.completions > 0
