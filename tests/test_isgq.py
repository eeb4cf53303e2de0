"""ISGQ: the layer factors are captured and sent, the dithered reconstruction error follows its
formula, the wrong seed does not decode, and the MSE codebook fit lowers the gradient's error."""

from __future__ import annotations

import threading

import torch

from switchagg.codecs._factor_quant import (
    codebook_values, dither_codes, dither_scale, dither_values, fit_codebook, refine_codebooks,
)
from switchagg.codecs._wire import block_generator
from switchagg.collectives import LocalGroup
from switchagg.methods import make_method


def _factors(rows=16, n_in=24, n_out=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(rows, n_in, generator=g))      # post-ReLU: exact zeros
    d = torch.randn(rows, n_out, generator=g) / rows
    return x, d


def _dithered(w, s, rank, t, salt):
    scale = dither_scale(w, s)
    codes = dither_codes(w, scale, s, block_generator(0, rank, t, 0, "cpu", salt))
    return codes, scale


def test_dithered_reconstruction_error_matches_its_formula():
    x, d = _factors()
    s, trials = 3, 2000
    g_true = d.T @ x
    sx, sd = dither_scale(x, s), dither_scale(d, s)
    xs, ds = x.expand(trials, *x.shape), d.expand(trials, *d.shape)   # independent draws each
    cx = dither_codes(xs, sx, s, block_generator(0, 0, 0, 0, "cpu", 1))
    cd = dither_codes(ds, sd, s, block_generator(0, 0, 0, 0, "cpu", 2))
    xh = dither_values(cx, sx, s, xs.shape, block_generator(0, 0, 0, 0, "cpu", 1))
    dh = dither_values(cd, sd, s, ds.shape, block_generator(0, 0, 0, 0, "cpu", 2))
    gh = dh.transpose(1, 2) @ xh
    vx = torch.where(x != 0, sx ** 2 / 12, torch.zeros_like(x))    # per entry, 0 for zeros
    vd = torch.where(d != 0, sd ** 2 / 12, torch.zeros_like(d))
    var = d.T ** 2 @ vx + vd.T @ x ** 2 + vd.T @ vx                 # Var(G-hat_kj)
    mse = float(((gh - g_true) ** 2).sum((1, 2)).mean())
    assert abs(mse / float(var.sum()) - 1) < 0.08          # 2000 trials: ~2% standard error
    z = (gh.mean(0) - g_true).abs() / (var / trials).sqrt()
    assert float(z.max()) < 5.5                             # unbiased, entry by entry


def test_dithered_decode_with_the_wrong_seed_fails():
    x, _ = _factors()
    codes, scale = _dithered(x, 7, 0, 0, 1)
    right = dither_values(codes, scale, 7, x.shape, block_generator(0, 0, 0, 0, "cpu", 1))
    wrong = dither_values(codes, scale, 7, x.shape, block_generator(1, 0, 0, 0, "cpu", 1))
    bound = float(scale) / 2 + 1e-6
    assert float((right - x).abs().max()) <= bound
    assert float((wrong - x).abs().max()) > bound


def test_mse_codebook_refit_lowers_the_gradient_error():
    x, d = _factors(rows=32)
    g = d.T @ x
    qx, cx = fit_codebook(x, 8)
    qd, cd = fit_codebook(d, 8)
    before = float(((codebook_values(qd, cd, d.shape).T @ codebook_values(qx, cx, x.shape) - g)
                    ** 2).sum())
    cx2, cd2 = refine_codebooks(qx, cx, qd, cd, x.shape, d.shape, g)
    after = float(((codebook_values(qd, cd2, d.shape).T @ codebook_values(qx, cx2, x.shape) - g)
                   ** 2).sum())
    assert after <= before and after < 0.5 * float((g ** 2).sum())
    assert torch.equal(qx == 0, x.reshape(-1) == 0)                  # exact zeros keep their symbol


_INIT = threading.Lock()   # torch's global generator: worker threads take turns


def _model():
    with _INIT:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 5))


def test_isgq_sends_linear_layers_as_factors_and_averages_over_workers():
    data = [torch.randn(8, 20, generator=torch.Generator().manual_seed(r)) for r in range(2)]

    def worker(collective):
        model = _model()
        out = {}
        for name in ("isgq-dithered", "isgq-mse"):
            method = make_method(name, collective, seed=1)
            method.codec.attach(model)
            model.zero_grad()
            model(data[collective.rank]).pow(2).mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            reduced, tel = method.reduce(grads, step=0, lr=0.1)
            out[name] = (grads, reduced, tel, method.codec.factored)
        return out

    r0, r1 = LocalGroup(2).run(worker)
    for name in ("isgq-dithered", "isgq-mse"):
        grads0, red0, tel, factored = r0[name]
        grads1, red1, _, _ = r1[name]
        assert factored == 2                               # both nn.Linear weights
        assert all(torch.equal(a, b) for a, b in zip(red0, red1))
        mean = [(a + b) / 2 for a, b in zip(grads0, grads1)]
        err = sum(float(((a - b) ** 2).sum()) for a, b in zip(red0, mean))
        assert err < 0.5 * sum(float((m ** 2).sum()) for m in mean)
        bits = 4 if name == "isgq-dithered" else 3
        books = 64 if name == "isgq-dithered" else 64 * 7
        assert tel.paper_bits == (bits * 8 * (20 + 32) + books) + (bits * 8 * (32 + 5) + books) \
            + (bits * 32 + 32) + (bits * 5 + 32)          # factors + the two biases direct


def test_isgq_without_a_model_quantizes_directly():
    def worker(collective):
        method = make_method("isgq-dithered", collective)
        g = torch.randn(10, 6)
        return method.reduce([g], step=0, lr=0.1), method.codec.factored, g

    (reduced, tel), factored, g = LocalGroup(1).run(worker)[0]
    assert factored == 0 and tel.paper_bits == 4 * 60 + 32
    assert float((reduced[0] - g).abs().max()) <= float(g.abs().max()) / 6.5 / 2 + 1e-6
