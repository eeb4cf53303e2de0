"""Seeded loss injection: reproducible, rates within bounds, nothing invented, nothing held forever."""

from __future__ import annotations

import numpy as np
import pytest

from switch_emulator._loss import LossInjector, LossRates
from switchagg.packet import Kind, make_burst

K = 8


def burst(first_chunk: int, n: int) -> np.ndarray:
    chunks = np.arange(first_chunk, first_chunk + n)
    return make_burst(Kind.DATA, 0, 0, chunks % 1000, np.zeros(n, int), chunks,
                      np.zeros((n, K), np.int32))


def injector(seed: int = 1, **rates) -> LossInjector:
    return LossInjector(LossRates(**rates), np.random.default_rng(seed))


def run(inj: LossInjector, bursts: int = 50, size: int = 1000, flow=0) -> list[np.ndarray]:
    return [inj.apply(burst(b * size, size), flow) for b in range(bursts)]


def test_loss_disabled_returns_the_same_array():
    inj = injector()
    packets = burst(0, 10)
    assert inj.apply(packets, 0) is packets
    assert inj.counters() == {"injected_drops": 0, "injected_duplicates": 0, "injected_reorders": 0}


def test_loss_seeded_reproducible_and_seed_sensitive():
    rates = dict(drop=0.1, duplicate=0.05, reorder=0.05)
    a = [out["chunk"].tolist() for out in run(injector(7, **rates), bursts=5)]
    b = [out["chunk"].tolist() for out in run(injector(7, **rates), bursts=5)]
    c = [out["chunk"].tolist() for out in run(injector(8, **rates), bursts=5)]
    assert a == b and a != c


@pytest.mark.parametrize("name", ["drop", "duplicate", "reorder"])
def test_loss_rates_within_statistical_bounds(name):
    p, n = 0.05, 50_000
    inj = injector(3, **{name: p})
    run(inj, bursts=50, size=1000)
    counted = {"drop": inj.drops, "duplicate": inj.duplicates, "reorder": inj.reorders}[name]
    # Binomial(n, p): 6 standard deviations (fails by chance about once in 10^9 runs).
    assert abs(counted - n * p) < 6 * np.sqrt(n * p * (1 - p))
    assert sum(inj.counters().values()) == counted


def test_loss_delivers_only_what_was_sent_and_held_packets_eventually():
    inj = injector(5, drop=0.1, duplicate=0.1, reorder=0.2)
    outs = run(inj, bursts=20, size=500)
    tail = inj.release(0)
    delivered = np.concatenate(outs + ([tail] if tail is not None else []))["chunk"]
    sent = np.arange(20 * 500)
    assert np.isin(delivered, sent).all()
    unique, copies = np.unique(delivered, return_counts=True)
    assert copies.max() <= 2 and int((copies - 1).sum()) == inj.duplicates
    assert len(sent) - len(unique) == inj.drops       # every packet not dropped arrives
    assert inj.release(0) is None and list(inj.held_flows()) == []


def test_loss_reorder_delivers_held_packets_ahead_of_the_next_burst_of_the_same_flow():
    # Held packets arrive after the rest of their own burst but never after a later burst: a data
    # packet overtaken by the sender's next burst could be taken by the switch for a new contribution.
    inj = injector(2, reorder=0.5)
    first = inj.apply(burst(0, 100), "a")
    held = 100 - len(first)
    assert 0 < held == inj.reorders and list(inj.held_flows()) == ["a"]
    assert len(inj.apply(burst(0, 0), "b")) == 0       # another flow does not release them
    second = inj.apply(burst(100, 100), "a")
    late = second["chunk"][:held]
    assert (late < 100).all() and (second["chunk"][held:] >= 100).all()
    assert not np.isin(late, first["chunk"]).any()


def test_loss_empty_burst_releases_held_and_forget_discards():
    inj = injector(2, reorder=1.0)
    assert len(inj.apply(burst(0, 10), 0)) == 0
    assert inj.apply(burst(0, 0), 0)["chunk"].tolist() == list(range(10))
    inj.apply(burst(0, 10), 0)
    inj.forget(0)
    assert inj.release(0) is None


def test_loss_input_is_never_modified():
    packets = burst(0, 100)
    packets.flags.writeable = False                 # as a zero-copy view of a ZeroMQ frame
    out = injector(1, drop=0.3, duplicate=0.3, reorder=0.3).apply(packets, 0)
    assert len(out) > 0


def test_loss_rates_validated():
    with pytest.raises(ValueError, match="drop"):
        LossRates(drop=-0.1)


def test_loss_rates_hold_over_tiny_bursts():
    # The distance to the next event is carried from burst to burst: bursts of 1 to 3 packets
    # must see the same per-packet rates as large ones.
    for name in ("drop", "duplicate", "reorder"):
        inj = injector(11, **{name: 0.02})
        sizes = np.random.default_rng(0).integers(1, 4, 30_000)
        for i, n in enumerate(sizes):
            inj.apply(burst(0, int(n)), i % 3)
        n, p = int(sizes.sum()), 0.02
        counted = {"drop": inj.drops, "duplicate": inj.duplicates, "reorder": inj.reorders}[name]
        assert abs(counted - n * p) < 6 * np.sqrt(n * p * (1 - p)), name


def test_loss_takes_the_same_packets_from_every_part_of_a_split_burst():
    inj = injector(4, drop=0.2, duplicate=0.2, reorder=0.2)
    rows = np.arange(200)
    delivered = []
    for b in range(5):
        ids = rows + 1000 * b
        heads = np.repeat(ids[:, None], 4, axis=1).astype(np.int32)
        vals = (ids[:, None] * K + np.arange(K)).astype(np.int32)
        h, v = inj.apply((heads, vals), "w")
        assert h.shape[1:] == (4,) and v.shape[1:] == (K,) and len(h) == len(v)
        delivered.append((h, v))
    delivered.append(inj.release("w"))
    for h, v in delivered:  # row i of the payloads still belongs with row i of the headers
        np.testing.assert_array_equal(v, h[:, :1] * K + np.arange(K))
    assert sum(len(h) for h, _ in delivered) == 5 * 200 - inj.drops + inj.duplicates


def test_loss_split_burst_without_events_is_delivered_as_it_is():
    inj = injector(1, drop=1e-9)
    parts = (np.zeros((10, 4), np.int32), np.zeros((10, K), np.int32))
    assert inj.apply(parts, 0) is parts


def test_loss_flow_keeps_one_layout():
    inj = injector(2, reorder=1.0)
    inj.apply((np.zeros((3, 4), np.int32), np.zeros((3, K), np.int32)), 0)
    with pytest.raises(ValueError, match="one layout"):
        inj.apply(burst(0, 3), 0)
    held = inj.release(0)           # what was held is still there, in its layout
    assert isinstance(held, tuple) and len(held[0]) == 3
