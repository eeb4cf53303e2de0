"""A lossy job's results gathered per worker (switch_emulator._coalesce): order kept, full batches
reported, a batch of another job or rank never mixed in."""

from __future__ import annotations

import numpy as np

from switch_emulator._coalesce import COALESCE_PACKETS, ResultBatches

K = 8


def part(first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(first, first + n)
    return (np.repeat(rows[:, None], 4, axis=1).astype(np.int32),
            (rows[:, None] * K + np.arange(K)).astype(np.int32))


def test_batches_keep_order_and_report_when_full():
    batches, job = ResultBatches(), object()
    first = part(0, 10)
    assert not batches.add(b"a", job, 0, *first)
    batch = batches.pop(b"a")
    heads, vals = batch.joined()
    assert heads is first[0] and vals is first[1]      # one part: no copy
    assert batches.pop(b"a") is None and len(batches) == 0
    n, full = 0, False
    while not full:
        full = batches.add(b"a", job, 0, *part(n, 100))
        n += 100
    assert n == -(-COALESCE_PACKETS // 100) * 100
    heads, vals = batches.pop(b"a").joined()
    np.testing.assert_array_equal(heads[:, 0], np.arange(n))
    np.testing.assert_array_equal(vals, np.arange(n)[:, None] * K + np.arange(K))


def test_batches_are_per_peer_and_a_new_job_or_rank_starts_over():
    batches, job, other = ResultBatches(), object(), object()
    batches.add(b"a", job, 0, *part(0, 3))
    batches.add(b"b", job, 1, *part(3, 2))
    assert sorted(batches.identities()) == [b"a", b"b"]
    batches.add(b"a", other, 0, *part(10, 4))         # the peer is in another job now
    batch = batches.pop(b"a")
    assert batch.job is other and batch.packets == 4
    batches.add(b"b", job, 2, *part(20, 1))           # or holds another rank
    assert batches.pop(b"b").rank == 2
    batches.add(b"c", job, 0, *part(0, 1))
    batches.clear()
    assert len(batches) == 0
