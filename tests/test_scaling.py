"""The scaling rules and methods over simulated workers: unbiasedness, bit-identical alpha, integer
ranges, IntDIANA's shifts, non-finite inputs, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from switchagg.collectives import LocalGroup
from switchagg.methods import METHODS, NonFiniteGradient, make_method
from switchagg.scaling import AlphaScaler, clip_bounds


def test_make_method_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match="intsgd-random"):
        make_method("intsgd", LocalGroup(1).member(0))
    assert set(METHODS) == {"sgd", "intsgd-random", "intsgd-determ", "intsgd-block", "intdiana",
                            "heuristic-switchml", "heuristic-global", "qsgd-4bit", "qsgd-8bit",
                            "natsgd", "terngrad", "terngrad-switch", "onebit-ef", "powersgd",
                            "isgq-mse", "isgq-dithered"}


def test_collective_kind_is_known_without_building_the_method():
    from switchagg.methods import collective_kind
    for name in METHODS:
        assert collective_kind(name) == make_method(name, LocalGroup(1).member(0)).collective_kind
    assert collective_kind("sgd") == "torch" and collective_kind("intdiana") == "int"
    with pytest.raises(ValueError, match="heuristic-switchml"):
        collective_kind("qsgd")


@pytest.mark.parametrize("bits,n,lo,hi", [(8, 16, -8, 7), (8, 3, -42, 42), (32, 1, -2**31, 2**31 - 1),
                                          (16, 5, -6553, 6553)])
def test_clip_bounds_keep_the_n_worker_sum_inside_b_bits(bits, n, lo, hi):
    assert clip_bounds(bits, n) == (lo, hi)
    assert n * lo >= -2 ** (bits - 1) and n * hi <= 2 ** (bits - 1) - 1


def test_randomized_rounding_through_intsgd_is_unbiased_with_variance_at_most_a_quarter():
    # Many draws in one call: x tiled 4000 times; each copy gets its own Philox numbers (the stream
    # is indexed by element), so copy i of coordinate j is draw i of coordinate j.
    draws, x = 4000, np.random.default_rng(0).standard_normal(32).astype(np.float32)
    tiled = torch.from_numpy(np.tile(x, draws))
    method = make_method("intsgd-random", LocalGroup(1, k=8).member(0), seed=11)
    method.reduce([tiled], step=0, lr=0.1)                     # first step: r known afterwards
    avg, tel = method.reduce([tiled], step=1, lr=0.1)
    alpha = tel.alpha
    assert np.abs(x * alpha).max() > 1.5                       # the test spans several integers
    err = (avg[0].numpy().astype(np.float64).reshape(draws, -1) - x) * alpha  # Q - alpha x
    z = err.mean(axis=0) / (0.5 / np.sqrt(draws))              # std of the mean <= 1/2 / sqrt(N)
    assert np.abs(z).max() < 4.5, f"biased coordinates: max |z| = {np.abs(z).max():.2f}"
    frac = (x.astype(np.float64) * alpha) % 1.0
    assert np.all(err.var(axis=0) <= frac * (1 - frac) + 0.02)
    assert err.var(axis=0).max() <= 0.25 + 0.02
    # Deterministic rounding is biased: its error is a fixed function of the coordinate.
    determ = make_method("intsgd-determ", LocalGroup(1, k=8).member(0))
    determ.reduce([tiled], step=0, lr=0.1)
    avg, tel = determ.reduce([tiled], step=1, lr=0.1)
    assert np.all((avg[0].numpy().reshape(draws, -1) == avg[0].numpy()[:x.size]).all(axis=0))


def _alphas(inputs_for_rank, method="intsgd-random", steps=6, world=3):
    def worker(c):
        m = make_method(method, c, seed=1)
        seen = []
        for step in range(steps):
            lr = 0.1 if step < 4 else 0.01                     # a decay step on the way
            m.reduce(inputs_for_rank(c.rank, step), step=step, lr=lr)
            if m.codec.scaler.ready and step:
                seen.append(m.codec.last_alpha.tobytes())
        return seen, m.codec.scaler.r.tobytes()
    return LocalGroup(world, k=8).run(worker)


def test_alpha_is_bit_identical_across_workers_whose_float_paths_differ():
    def inputs(rank, step):
        rng = np.random.default_rng([rank, step])
        g = rng.standard_normal(300) * 10.0 ** rng.integers(-3, 3)
        # Each worker holds its gradient differently: float64, float32 reversed-then-flipped, bf16.
        if rank == 0:
            return [torch.from_numpy(g)]
        if rank == 1:
            return [torch.from_numpy(g[::-1].astype(np.float32).copy()).flip(0)]
        return [torch.from_numpy(g).to(torch.bfloat16)]
    for method in ("intsgd-random", "intsgd-block", "intdiana"):
        per_worker = _alphas(inputs, method)
        assert all(w == per_worker[0] for w in per_worker), method
        assert len(per_worker[0][0]) == 5


def test_alpha_scaler_follows_the_formula_and_rescales_r_on_lr_changes():
    s = AlphaScaler(4, [100], beta=0.9, eps=1e-8)
    s.observe(2.0, lr=0.1)
    a = s.alpha(0.1)[0]
    assert a == np.float32(0.1 / np.sqrt(2 * 4 * 2.0 / 100 + 1e-16))
    assert s.alpha(0.01)[0] == pytest.approx(a, rel=1e-6)      # lr_rescale: eta-free alpha
    literal = AlphaScaler(4, [100], lr_rescale=False)
    literal.observe(2.0, lr=0.1)
    assert literal.alpha(0.01)[0] == pytest.approx(a / 10, rel=1e-6)
    with pytest.raises(RuntimeError):
        AlphaScaler(2, [10]).alpha(0.1)
    with pytest.raises(ValueError):
        s.alpha(0.0)


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=25, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=40), world=st.sampled_from([2, 3, 16]),
       scale=st.sampled_from([1.0, 1e30, 1e-30]), bits=st.sampled_from([8, 32]))
def test_heuristics_never_wrap_for_any_magnitudes(values, world, scale, bits):
    base = np.array(values, dtype=np.float32)

    def worker(c):
        with np.errstate(over="ignore"):  # overflow to inf is clamped to the float32 extremes below
            x = (base * np.float32(scale) if c.rank % 2 else base[::-1].copy()).astype(np.float32)
        x = np.nan_to_num(x, posinf=3e38, neginf=-3e38).astype(np.float32)
        out = []
        for name in ("heuristic-switchml", "heuristic-global"):
            _, tel = make_method(name, c, bits=bits).reduce([torch.from_numpy(x)], step=0, lr=0.1)
            out.append((tel.wraps, tel.max_abs_sum, tel.sum_bits))
        return out
    for per_worker in LocalGroup(world, k=8).run(worker):
        for wraps, max_sum, sum_bits in per_worker:
            assert wraps == 0 and sum_bits <= bits and max_sum <= 2 ** (bits - 1)


def test_budget_of_8_bits_never_wraps_even_when_alpha_explodes():
    def worker(c):
        m = make_method("intsgd-determ", c, bits=8)
        x = np.full(50, 1.0 + c.rank, np.float32)
        tels = [m.reduce([torch.from_numpy(x)], step=s, lr=1.0)[1] for s in range(3)]
        m.codec.scaler.r[:] = 1e-30                                  # alpha -> huge: everything clips
        tels.append(m.reduce([torch.from_numpy(x)], step=3, lr=1.0)[1])
        return tels
    for tels in LocalGroup(16, k=8).run(worker):
        assert all(t.wraps == 0 and t.sum_bits <= 8 for t in tels)
        assert tels[-1].clip_fraction == 1.0


def _heterogeneous_gd(method, steps=200, world=4, seed=0):
    """Full-batch GD on least squares split by worker with different optima (grad f_i(x*) != 0)."""
    rng = np.random.default_rng(seed)
    a = [rng.standard_normal((30, 10)) for _ in range(world)]
    b = [ai @ rng.standard_normal(10) * 3 + i for i, ai in enumerate(a)]
    lr = 0.5 / max(np.linalg.eigvalsh(ai.T @ ai / 30).max() for ai in a)

    def worker(c):
        m = make_method(method, c, seed=seed)
        x = np.zeros(10)
        maxq = []
        for step in range(steps):
            g = a[c.rank].T @ (a[c.rank] @ x - b[c.rank]) / 30
            avg, tel = m.reduce([torch.from_numpy(g.astype(np.float32))], step=step, lr=lr)
            x = x - lr * avg[0].numpy().astype(np.float64)
            maxq.append(tel.max_abs_q)
        return m, np.array(maxq), x
    return LocalGroup(world, k=8).run(worker)


def test_intdiana_shifts_are_consistent_and_its_integers_stay_bounded_where_intsgd_grows():
    diana = _heterogeneous_gd("intdiana")
    h = [m.codec.h_global[0].numpy().tobytes() for m, _, _ in diana]
    assert all(v == h[0] for v in h)                           # h bit-identical on every worker
    mean_local = np.mean([m.codec.h_local[0].numpy() for m, _, _ in diana], axis=0)
    np.testing.assert_allclose(diana[0][0].codec.h_global[0].numpy(), mean_local, rtol=1e-4,
                               atol=1e-5)
    intsgd = _heterogeneous_gd("intsgd-random")
    diana_q = max(q[10:].max() for _, q, _ in diana)
    intsgd_q = [q for _, q, _ in intsgd]
    assert diana_q <= 16, f"IntDIANA integers not bounded: {diana_q}"
    # IntSGD: steps shrink, alpha grows, alpha g_i -> alpha grad f_i(x*) grows geometrically.
    assert max(q[-10:].max() for q in intsgd_q) > 100 * max(q[5:15].max() for q in intsgd_q)


def test_non_finite_gradients_are_refused_before_anything_is_sent():
    c = LocalGroup(1).member(0)
    for name in METHODS:
        m = make_method(name, c, names=["conv.weight", "fc.bias"])
        with pytest.raises(NonFiniteGradient, match="fc.bias"):
            m.reduce([torch.zeros(3), torch.tensor([1.0, float("nan")])], step=0, lr=0.1)
        assert c.stats.calls == 0


@pytest.mark.parametrize("name", [m for m in METHODS])
def test_a_method_restored_from_state_dict_continues_bit_for_bit(name):
    def inputs(rank, step):
        g = torch.Generator().manual_seed(100 * rank + step)
        return [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]

    def worker(c):
        a = make_method(name, c, seed=2)
        for step in range(3):
            a.reduce(inputs(c.rank, step), step=step, lr=0.1)
        b = make_method(name, c, seed=2)
        b.load_state_dict(a.state_dict())
        outs = [m.reduce(inputs(c.rank, 3), step=3, lr=0.05)[0] for m in (a, b)]
        return [torch.equal(x, y) for x, y in zip(*outs)]
    assert all(all(flags) for flags in LocalGroup(2, k=8).run(worker))


def test_local_group_reports_a_worker_failure_and_can_run_again():
    group = LocalGroup(2, k=8, timeout=5)

    def worker(c):
        if c.rank == 1:
            raise RuntimeError("boom")
        c.allreduce_int(np.zeros(3, np.int32))
    with pytest.raises(RuntimeError, match="boom"):
        group.run(worker)
    assert group.run(lambda c: c.allreduce_int(np.ones(2, np.int32)).tolist()) == [[2, 2]] * 2
