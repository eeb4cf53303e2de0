"""Philox4x32-10 against the published Random123 known answers, and the element keying rule."""

from __future__ import annotations

import numpy as np
import pytest

from switchagg.kernels import philox4x32_10
from switchagg.kernels._philox import KNOWN_ANSWERS, check_stream_ids, element_bits

@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox4x32_10_known_answers(counter, key, expected):
    out = philox4x32_10(np.array([counter], dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert out.dtype == np.uint32
    assert tuple(out[0].tolist()) == expected


def test_philox4x32_10_batch_equals_one_at_a_time():
    rng = np.random.default_rng(1)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    key = [0x12345678, 0x9ABCDEF0]
    whole = philox4x32_10(counters, key)
    for i in (0, 17, 63):
        assert (philox4x32_10(counters[i:i + 1], key)[0] == whole[i]).all()


def test_philox4x32_10_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        philox4x32_10(np.zeros((3, 2), np.uint32), [0, 0])
    with pytest.raises(ValueError, match="key"):
        philox4x32_10(np.zeros((3, 4), np.uint32), [0, 0, 0])


def test_element_bits_follows_the_keying_rule():
    seed, rank, step = 0x0123456789ABCDEF, 3, 77
    g = np.array([0, 1, 5, 4 * 2**32 + 2, 4 * 2**32 + 7], dtype=np.uint64)
    q = g // 4
    counters = np.stack([q & 0xFFFFFFFF, q >> 32, np.full_like(q, step), np.full_like(q, rank)],
                        axis=1).astype(np.uint32)
    words = philox4x32_10(counters, [seed & 0xFFFFFFFF, seed >> 32])
    expected = words[np.arange(g.size), (g % 4).astype(np.int64)]
    got = [element_bits(seed, rank, step, int(gi), 1)[0] for gi in g]
    assert got == expected.tolist()


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 1001])
def test_element_bits_pieces_equal_whole(offset):
    whole = element_bits(9, 1, 2, offset, 103)
    cuts = [0, 1, 2, 7, 50, 51, 103]
    pieces = [element_bits(9, 1, 2, offset + a, b - a) for a, b in zip(cuts, cuts[1:])]
    assert (np.concatenate(pieces) == whole).all()


def test_element_bits_streams_differ_by_seed_rank_step():
    base = element_bits(5, 0, 0, 0, 256)
    for other in (element_bits(6, 0, 0, 0, 256), element_bits(5, 1, 0, 0, 256),
                  element_bits(5, 0, 1, 0, 256), element_bits(5 + 2**32, 0, 0, 0, 256)):
        assert np.count_nonzero(other == base) < 3  # equal words by chance: ~256 / 2^32


def test_element_bits_are_uniform():
    bits = element_bits(42, 0, 0, 0, 1 << 16)
    counts = np.bincount(bits >> 28, minlength=16)  # top 4 bits
    expected = bits.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.0  # 15 degrees of freedom: p ~ 1e-4


@pytest.mark.parametrize("kwargs", [dict(seed=-1), dict(seed=2**64), dict(rank=2**32), dict(step=-1),
                                    dict(offset=-5)])
def test_check_stream_ids_rejects_out_of_range(kwargs):
    args = dict(seed=0, rank=0, step=0, offset=0) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        check_stream_ids(**args)
