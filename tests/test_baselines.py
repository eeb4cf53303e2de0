"""The papers' baselines (QSGD, NatSGD, TernGrad, 1-bit SGD): the statistical properties and exact
bit counts of compressors.md §13, checked against exact per-coordinate formulas (z-tests, not
absolute tolerances)."""

from __future__ import annotations

import math

import pytest
import torch

from switchagg.codecs._base import Bucket
from switchagg.codecs._wire import (
    Reader, Writer, block_generator, elias_omega_bits, pack_bits, unpack_bits,
)
from switchagg.codecs.natsgd import natural_codes, natural_values
from switchagg.codecs.qsgd import qsgd_levels
from switchagg.codecs.terngrad import ternarize
from switchagg.collectives import LocalGroup
from switchagg.collectives._base import HOST_TRANSFERS
from switchagg.methods import make_codec, make_method

N = 3000


def z_max(samples: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> float:
    """max_i |mean_i - x_i| / (sigma_i / sqrt(N)) over coordinates with sigma_i > 0; coordinates
    with sigma_i = 0 must be exact."""
    mean = samples.double().mean(0)
    live = var > 0
    assert torch.equal(mean[~live], x.double()[~live])
    return float(((mean - x.double()).abs()[live] / (var[live].sqrt() / math.sqrt(len(samples))))
                 .max())


def test_pack_roundtrip_every_width():
    g = torch.Generator().manual_seed(0)
    for width in (1, 2, 3, 4, 5, 7, 8, 9):
        codes = torch.randint(0, 2 ** width, (37,), generator=g)
        packed = pack_bits(codes, width)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * width / 8)
        assert torch.equal(unpack_bits(packed, width, 37), codes)
    w = Writer("cpu")
    w.floats(torch.tensor([1.5, -2.0]))
    w.ints([7])
    r = Reader(w.payload())
    assert torch.equal(r.floats(2), torch.tensor([1.5, -2.0])) and r.ints(1) == [7]


def test_elias_omega_lengths():
    table = {1: 1, 2: 3, 3: 3, 4: 6, 7: 6, 8: 7, 15: 7, 16: 11, 100: 13, 127: 13, 1000: 17}
    got = elias_omega_bits(torch.tensor(list(table)))
    assert got.tolist() == list(table.values())


def test_qsgd_unbiased_with_its_exact_variance_and_bound():
    torch.manual_seed(0)
    x, s, b = torch.randn(1000), 3, 250
    # N copies in one call: b divides d, so each copy has its own buckets and random numbers
    levels, neg, norms = qsgd_levels(x.repeat(N), s, b, block_generator(0, 0, 0, 0, "cpu"))
    values = (norms / s).repeat_interleave(b) * levels.float()
    out = torch.where(neg, -values, values).view(N, -1)
    norms = torch.linalg.vector_norm(x.view(-1, b), dim=1).repeat_interleave(b)
    y = s * x.abs() / norms
    p = y - y.floor()
    var = (norms / s) ** 2 * p * (1 - p)
    assert z_max(out, x, var) < 5.5
    mse = float(((out - x) ** 2).sum(1).mean())
    exact = float(var.sum())
    assert abs(mse / exact - 1) < 0.05
    bound = sum(min(b / s ** 2, math.sqrt(b) / s) * float((c ** 2).sum()) for c in x.view(-1, b))
    assert exact <= bound


def test_qsgd_exact_bits_for_a_known_input():
    codec = make_codec("qsgd-4bit", world_size=1, rank=0, s=5, bucket_size=5)
    codec.begin(0, 0.1)
    payload = codec.encode(torch.tensor([3.0, 0.0, -4.0, 0.0, 0.0]), Bucket.whole(5))
    # levels exact (s |x_i| / ||x|| are integers): 3 bits x 5 + 5 sign bits + one fp32 norm
    assert payload.values.numel() == 2 + 1 + 4
    # Elias omega: 32 + (|w(1)| + 1 + |w(3)|) + (|w(2)| + 1 + |w(4)|) = 32 + 5 + 10
    assert codec.tel.paper_bits == 47
    out = torch.empty(5)
    codec.decode([payload.values], payload.ctx, out)
    assert torch.equal(out, torch.tensor([3.0, 0.0, -4.0, 0.0, 0.0]))


def test_natural_compression_unbiased_variance_and_fixed_points():
    torch.manual_seed(1)
    x = torch.randn(1000) * 3
    out = natural_values(natural_codes(x.repeat(N), block_generator(0, 0, 0, 0, "cpu"))).view(N, -1)
    low = 2.0 ** torch.floor(torch.log2(x.abs().double()))
    var = (2 * low - x.abs().double()) * (x.abs().double() - low)
    assert z_max(out, x, var) < 5.5
    assert float(var.sum()) <= float((x.double() ** 2).sum()) / 8
    assert torch.equal(torch.sign(out[0]), torch.sign(x))
    powers = torch.tensor([1.0, -0.5, 2.0 ** -20, 1024.0, 0.0])
    assert torch.equal(natural_values(natural_codes(powers, block_generator(0, 0, 0, 0, "cpu"))),
                       powers)


def test_natsgd_sends_one_byte_per_coordinate_and_counts_nine():
    codec = make_codec("natsgd", world_size=1, rank=0)
    codec.begin(0, 0.1)
    payload = codec.encode(torch.randn(101), Bucket.whole(101))
    assert payload.values.numel() == 101 and codec.tel.paper_bits == 9 * 101


def test_terngrad_unbiased_second_moment_and_bits():
    torch.manual_seed(2)
    x = torch.randn(1000)
    s = x.abs().max()
    out = (s * ternarize(x.repeat(N), s, block_generator(0, 0, 0, 0, "cpu")).float()).view(N, -1)
    var = s.double() * x.abs().double() - x.double() ** 2
    assert z_max(out, x, var) < 5.5
    second = float((out.double() ** 2).sum(1).mean())
    assert abs(second / float(s * x.abs().sum()) - 1) < 0.02
    codec = make_codec("terngrad", world_size=1, rank=0)
    codec.begin(0, 0.1)
    payload = codec.encode(torch.randn(103), Bucket.whole(103))
    assert payload.values.numel() == 4 + math.ceil(2 * 103 / 8)
    assert codec.tel.paper_bits == 2 * 103 + 32


def test_terngrad_clipping_bounds_the_scaler():
    codec = make_codec("terngrad", world_size=1, rank=0, clip=2.5)
    x = torch.randn(1000)
    x[0] = 100.0
    codec.begin(0, 0.1)
    payload = codec.encode(x, Bucket.whole(1000))
    out = torch.empty(1000)
    codec.decode([payload.values], payload.ctx, out)
    assert float(out.abs().max()) <= 2.5 * float(x.std()) + 1e-5


def test_terngrad_switch_shares_a_power_of_two_scaler_and_sums_integers():
    torch.manual_seed(3)
    grads = [torch.randn(64) * (r + 1) for r in range(3)]

    def worker(collective):
        method = make_method("terngrad-switch", collective, seed=1)
        return method.reduce([grads[collective.rank]], step=0, lr=0.1)

    (out, tel), (out1, _), _ = LocalGroup(3).run(worker)
    assert torch.equal(out[0], out1[0])
    assert make_codec("terngrad-switch", world_size=3, rank=0).runs_on_switch()
    s = 2.0 ** math.frexp(float(max(g.abs().max() for g in grads)))[1]
    assert set((out[0] * 3 / s).round().tolist()) <= set(range(-3, 4))
    assert tel.max_abs_sum <= 3 and tel.rounds == 2


def test_onebit_error_feedback_residual_identity():
    g = torch.randn(300)

    def worker(collective):
        method = make_method("onebit-ef", collective)
        total = torch.zeros(300)
        for k in range(20):
            total += method.reduce([g], step=k, lr=0.1)[0][0]
        return total, method.codec.residuals[0]

    total, e = LocalGroup(1).run(worker)[0]
    assert torch.allclose(total, 20 * g - e, atol=1e-4)
    assert float(e.norm()) < 5 * float(g.norm())     # bounded: no linear growth in T = 20
    codec = make_codec("onebit-ef", world_size=1, rank=0)
    codec.begin(0, 0.1)
    payload = codec.encode(torch.randn(101), Bucket.whole(101))
    assert payload.values.numel() == 8 + 13 and codec.tel.paper_bits == 101 + 64


@pytest.mark.parametrize("name", ["qsgd-4bit", "qsgd-8bit", "natsgd", "terngrad", "onebit-ef"])
def test_gather_methods_agree_on_every_rank_and_average(name):
    torch.manual_seed(5)
    grads = [[torch.randn(30, 20), torch.randn(20)] for _ in range(3)]

    def worker(collective):
        return make_method(name, collective, seed=2).reduce(grads[collective.rank], step=1,
                                                           lr=0.1)

    results = LocalGroup(3).run(worker)
    for out, _ in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][0]))
    mean = [sum(g[i] for g in grads) / 3 for i in range(2)]
    err = sum(float(((a - b) ** 2).sum()) for a, b in zip(results[0][0], mean))
    assert err < 2.0 * sum(float((b ** 2).sum()) for b in mean) * 3
    assert results[0][1].paper_bits > 0


@pytest.mark.parametrize("name", ["qsgd-4bit", "natsgd", "terngrad", "onebit-ef", "isgq-mse",
                                  "isgq-dithered"])
def test_gather_methods_hand_only_packed_bytes_to_the_transport(name):
    HOST_TRANSFERS.clear()
    grads = [torch.randn(30, 20), torch.randn(20)]
    LocalGroup(2).run(lambda c: make_method(name, c).reduce(grads, step=0, lr=0.1))
    assert set(HOST_TRANSFERS) == {"uint8"}, dict(HOST_TRANSFERS)
