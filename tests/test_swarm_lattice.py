"""The mod-q lattice quantizer: exact decode inside the radius, detected failure outside it,
unbiased stochastic rounding, d*log2(q) bits, and exact mean preservation of pairwise averaging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchagg.swarm import lattice


@pytest.mark.parametrize("bits", lattice.BITS)
def test_decode_is_the_nearest_lattice_point_inside_the_radius(bits):
    rng = np.random.default_rng(bits)
    q, side, d = 1 << bits, 0.01, 5000
    x = rng.normal(size=d) * 3
    radius = side * (q - 1) / 2
    # references up to 0.999 of the radius away, in every coordinate at once
    y = x + rng.uniform(-0.999, 0.999, size=d) * radius
    code = lattice.encode(x, side, bits, rng=None)
    out = lattice.decode(code, y)
    assert out is not None
    np.testing.assert_array_equal(out, side * np.rint(x / side))


@pytest.mark.parametrize("bits", lattice.BITS)
def test_stochastic_decode_is_exact_inside_its_radius(bits):
    rng = np.random.default_rng(100 + bits)
    side, d = 0.5, 4000
    x = rng.normal(size=d) * 100
    y = x + rng.uniform(-0.999, 0.999, size=d) * lattice.decode_radius(side, bits)
    code = lattice.encode(x, side, bits, rng=np.random.default_rng(1))
    z = lattice.lattice_point(x, side, np.random.default_rng(1))
    np.testing.assert_array_equal(lattice.decode(code, y), side * z)


@pytest.mark.parametrize("bits", lattice.BITS)
def test_decode_beyond_the_radius_is_off_by_multiples_of_q_side_and_the_check_says_so(bits):
    rng = np.random.default_rng(7)
    q, side, d = 1 << bits, 0.25, 300
    x = rng.normal(size=d)
    y = x.copy()
    y[17] += 0.6 * q * side    # |z - y/s| > q/2 in one coordinate only
    code = lattice.encode(x, side, bits, rng=None)
    assert lattice.decode(code, y) is None
    # What the raw decode would have produced: wrong there, by a multiple of q*side, right elsewhere.
    c = lattice.unpack(code.codes, bits, d)
    z = c + q * np.rint((y / side - c) / q).astype(np.int64)
    truth = np.rint(x / side).astype(np.int64)
    wrong = np.flatnonzero(z != truth)
    assert list(wrong) == [17] and (z[17] - truth[17]) % q == 0


def test_stochastic_rounding_is_unbiased_with_the_exact_variance():
    # z-scores against the exact per-coordinate sigma (no absolute tolerance).
    rng = np.random.default_rng(3)
    side, d, n = 0.1, 400, 4000
    x = rng.normal(size=d)
    y = x + 0.5 * rng.uniform(-1, 1, size=d) * lattice.decode_radius(side, 8)
    draws = np.stack([lattice.decode(lattice.encode(x, side, 8, rng), y) for _ in range(n)])
    frac = x / side - np.floor(x / side)
    sigma = side * np.sqrt(frac * (1 - frac))
    keep = sigma > 1e-9
    z = np.abs(draws.mean(0) - x)[keep] / (sigma[keep] / np.sqrt(n))
    assert z.max() < 5.5
    var = draws.var(0)
    assert np.all(var <= side ** 2 / 4 * 1.2)
    ratio = var[keep].sum() / (sigma[keep] ** 2).sum()
    assert abs(ratio - 1) < 0.05


@pytest.mark.parametrize("bits", lattice.BITS)
@pytest.mark.parametrize("d", [1, 2, 3, 1000, 1001])
def test_the_code_is_d_log2q_bits(bits, d):
    code = lattice.encode(np.linspace(-1, 1, d), 0.01, bits, rng=np.random.default_rng(0))
    assert len(code.codes) == lattice.packed_size(d, bits) == -(-d * bits // 8)
    assert len(code.check) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=0, max_size=50), st.sampled_from(lattice.BITS))
def test_pack_then_unpack_is_the_identity(values, bits):
    codes = np.array(values, dtype=np.int64) % (1 << bits)
    assert list(lattice.unpack(lattice.pack(codes, bits), bits, len(codes))) == list(codes)


def test_unpack_rejects_a_wrong_length():
    with pytest.raises(ValueError, match="expected 5"):
        lattice.unpack(b"\x00" * 4, 4, 10)


def test_encode_rejects_bad_inputs_and_widens_a_side_too_fine_for_float64():
    with pytest.raises(ValueError, match="bits"):
        lattice.encode(np.zeros(3), 0.1, 7, rng=None)
    with pytest.raises(ValueError, match="NaN"):
        lattice.encode(np.array([0.0, np.nan]), 0.1, 8, rng=None)
    with pytest.raises(ValueError, match="side"):
        lattice.encode(np.zeros(3), 0.0, 8, rng=None)
    code = lattice.encode(np.array([1e6, -1.0]), 1e-20, 8, rng=None)
    assert code.side >= 1e6 / 2 ** 50
    np.testing.assert_allclose(lattice.decode(code, np.array([1e6, -1.0])), [1e6, -1.0], rtol=0,
                               atol=code.side / 2)


def test_side_for_puts_margin_times_distance_inside_the_radius():
    side = lattice.side_for(0.3, 8, margin=2.0)
    assert lattice.decode_radius(side, 8) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="distance"):
        lattice.side_for(-1.0, 8)
    with pytest.raises(ValueError, match="margin"):
        lattice.side_for(1.0, 8, margin=0)


def test_pairwise_averaging_preserves_the_mean_exactly_unquantized_and_in_expectation_quantized():
    rng = np.random.default_rng(11)
    n, d = 6, 50
    models = rng.normal(size=(n, d))
    mean0 = models.mean(0)
    exact = models.copy()
    for _ in range(200):
        i, j = rng.choice(n, size=2, replace=False)
        exact[i] = exact[j] = (exact[i] + exact[j]) / 2
    np.testing.assert_allclose(exact.mean(0), mean0, atol=1e-12)
    # Quantized exchange (each side decodes the other's model with its own as reference): the
    # drift of the mean is a sum of independent zero-mean rounding errors, of known variance.
    side, trials, drifts = 0.05, 300, []
    for t in range(trials):
        qm = models.copy()
        r = np.random.default_rng(1000 + t)
        i, j = 0, 1
        xi = lattice.decode(lattice.encode(qm[i], side, 8, r), qm[j])
        xj = lattice.decode(lattice.encode(qm[j], side, 8, r), qm[i])
        qm[i], qm[j] = (qm[i] + xj) / 2, (qm[j] + xi) / 2
        drifts.append(qm.mean(0) - mean0)
    drifts = np.array(drifts)
    frac = lambda v: v / side - np.floor(v / side)
    var = (side ** 2 * (frac(models[0]) * (1 - frac(models[0])) + frac(models[1]) * (1 - frac(models[1])))
           / (2 * n) ** 2)
    keep = var > 1e-12
    z = np.abs(drifts.mean(0))[keep] / np.sqrt(var[keep] / trials)
    assert z.max() < 5.5
