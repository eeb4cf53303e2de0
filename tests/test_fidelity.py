"""Fidelity to the papers and the authors' code: IntDIANA's alpha from the full step, the step-0
rules, the float norm every worker agrees on, rounds counted from what was sent."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from switchagg.collectives import LocalGroup
from switchagg.errors import ConfigError
from switchagg.methods import make_method
from switchagg.scaling.exact_norm import float_sq_norm


@pytest.mark.parametrize("values", [np.random.default_rng(0).standard_normal(5000),
                                    [1e-45, 3e38, -2.5, 0.0, -0.0], [1e-30] * 7, []])
def test_float_sq_norm_is_close_to_exact_and_order_free(values):
    v = torch.tensor(np.asarray(values, dtype=np.float32))
    exact = float(sum(Fraction(float(x)) ** 2 for x in v.tolist()))
    got = float_sq_norm(v)
    assert abs(got - exact) <= 1e-6 * exact
    assert float_sq_norm(v.flip(0)) == got                # no order inside a tensor
    assert float_sq_norm(v[:3], v[3:]) == float_sq_norm(v[:3], v[3:])
    with pytest.raises(TypeError, match="float32"):
        float_sq_norm(v.double())


def _grads(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 * rank + step)
    # heterogeneous: each worker's gradient has its own offset (grad f_i(x*) != 0)
    return [torch.randn(40, generator=g) + rank, torch.randn(9, generator=g) - rank]


def _run(method: str, steps: int = 4, world: int = 3, lrs=(0.1, 0.2, 0.2, 0.05), **options):
    def worker(c):
        m = make_method(method, c, seed=1, **options)
        out = []
        for step in range(steps):
            avg, tel = m.reduce(_grads(c.rank, step), step=step, lr=lrs[step])
            out.append((torch.cat([a.reshape(-1) for a in avg]), tel,
                        None if getattr(m.codec, "scaler", None) is None
                        else m.codec.scaler.r.copy()))
        return out
    return LocalGroup(world, k=8).run(worker)


def test_intdiana_alpha_follows_the_full_step():
    lrs = (0.1, 0.2, 0.2, 0.05)
    runs = _run("intdiana", lrs=lrs, beta=0.5)
    r = None
    for step, (avg, tel, r_after) in enumerate(runs[0]):
        # The full step x^{k+1} - x^k = -eta g~^k: what every worker applied, rescaled as the
        # scaler does when the learning rate changes.
        sq = lrs[step] ** 2 * float(np.sum(avg.double().numpy() ** 2))
        if r is None:
            r = sq
        else:
            r = 0.5 * r * (lrs[step] / lrs[step - 1]) ** 2 + 0.5 * sq
        assert r_after[0] == pytest.approx(r, rel=1e-5)
    # bit-identical scales and averages on every worker
    for other in runs[1:]:
        assert all(torch.equal(a[0], b[0]) and a[1].alpha == b[1].alpha and
                   np.array_equal(a[2], b[2]) for a, b in zip(runs[0], other))
    innovation = _run("intdiana", lrs=lrs, beta=0.5, alpha_from="innovation")
    assert innovation[0][-1][2][0] != pytest.approx(runs[0][-1][2][0], rel=1e-3)


@pytest.mark.parametrize("method", ["intsgd-random", "intsgd-block", "intdiana"])
def test_first_step_rules_run_and_say_which_ran(method):
    default = _run(method, steps=2)[0]
    assert default[0][1].scaling == "first-step-heuristic" and default[0][1].rounds == 2
    fixed = _run(method, steps=2, first_step="fixed-alpha")[0]
    tel = fixed[0][1]
    assert tel.scaling == "first-step-fixed-alpha" and tel.alpha_max == 100.0 and tel.rounds == 1
    # Q_0 = Int(100 g_0): rank 0's max |Q_i| is 100 times its largest entry, give or take rounding
    top = float(torch.cat(_grads(0, 0)).abs().max())
    assert abs(tel.max_abs_q - 100 * top) <= 1 + 100 * top * 1e-6
    assert fixed[1][1].scaling == "alpha"
    raw = _run(method, steps=2, first_step="uncompressed")[0]
    tel = raw[0][1]
    assert tel.scaling == "first-step-uncompressed" and tel.rounds == 1 and tel.numel_int == 0
    mean = sum(torch.cat(_grads(r, 0)) for r in range(3)) / 3
    assert torch.allclose(raw[0][0], mean, atol=1e-6)
    assert raw[1][1].scaling == "alpha" and raw[1][1].max_abs_q < 100
    with pytest.raises(ConfigError, match="first_step"):
        _run(method, steps=1, first_step="paper")


def test_method_opt_reaches_the_methods_that_take_it():
    from switchagg.workers.worker import check_method_options, collective_kind, method_options
    pairs = ["first_step=uncompressed", "alpha_from=innovation"]
    assert method_options("intdiana", pairs) == {"first_step": "uncompressed",
                                                 "alpha_from": "innovation"}
    assert method_options("intsgd-random", pairs) == {"first_step": "uncompressed"}
    assert method_options("sgd", pairs) == {}
    # floats at step 0: the method runs over torch.distributed, not the integer switch
    assert collective_kind("intsgd-random", {"first_step": "uncompressed"}) == "torch"
    assert collective_kind("intsgd-random", {"first_step": "fixed-alpha"}) == "int"
    check_method_options(["sgd", "intdiana"], pairs)
    with pytest.raises(ValueError, match="alpha_from"):
        check_method_options(["sgd", "intsgd-random"], pairs)


def test_vr_logreg_converges_where_minibatch_sgd_stalls():
    import torch.distributed as tdist

    from switchagg.collectives import LocalGroup
    from switchagg.ddp import hook_for
    from switchagg.workers.tasks import make_task
    from switchagg.workers.train import TrainConfig, train

    steps, batch, lam = 200, 8, 0.05
    vr_task = make_task("logreg", vr=True)
    assert vr_task.preset.batch_size == max(1, len(vr_task.a) // 240)
    lr = make_task("logreg", vr=True, lam=lam).preset.lr
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)

    def dist2(method, vr):
        # the same mini-batches and step size, with and without L-SVRG's estimator
        def worker(c):
            t = make_task("logreg", vr=vr, lam=lam)
            state, _ = hook_for(method, collective=c, seed=0)
            return train(t, state, rank=c.rank, world_size=2,
                         config=TrainConfig(max_steps=steps, epochs=100, batch_size=batch,
                                            lr=lr, eval_every=100))
        out = LocalGroup(2).run(worker, timeout=120)
        assert out[0]["params_digest"] == out[1]["params_digest"]
        return out[0]["evaluation"]["dist2"]
    noisy, reduced = dist2("sgd", False), dist2("sgd", True)
    diana = dist2("intdiana", True)
    assert reduced < 1e-3 * noisy, (reduced, noisy)         # L-SVRG: no noise ball
    assert diana < 0.05 * noisy, (diana, noisy)             # VR-IntDIANA too (measured: 0.01x)
    with pytest.raises(ValueError, match="mini-batches"):
        make_task("logreg", vr=True).shard(0, 2, 0)


def test_presets_scale_the_lr_by_workers_with_a_five_epoch_warmup(tmp_path):
    from switchagg.workers.tasks import TASKS
    p = TASKS["cifar10-resnet18"].preset
    assert p.lr_at(0, world_size=16) == pytest.approx(0.1)
    assert p.lr_at(2.5, world_size=16) == pytest.approx(0.1 * (1 + 15 * 0.5))
    assert p.lr_at(5, world_size=16) == pytest.approx(1.6)
    assert p.lr_at(150, world_size=16) == pytest.approx(0.16)
    assert p.lr_at(100, world_size=1) == pytest.approx(0.1)       # one worker: the paper's lr
    lm = TASKS["wikitext2-lstm"].preset
    assert lm.lr_at(5, world_size=16) == pytest.approx(1.25 * 16) and lm.warmup_epochs == 5
    from tests.test_tasks import _write_cifar
    _write_cifar(tmp_path)
    from switchagg.workers.tasks import make_task
    ints = make_task("cifar10-resnet18", data=str(tmp_path), width=8, recipe="intsgd").preset
    assert ints.lr_at(5, world_size=16) == pytest.approx(3.2) and ints.momentum_before_reduce
    assert not make_task("cifar10-resnet18", data=str(tmp_path), width=8).preset \
        .momentum_before_reduce


def test_momentum_before_the_reduce_equals_after_for_an_exact_average():
    import dataclasses

    import torch.distributed as tdist

    from switchagg.ddp import hook_for
    from switchagg.workers.tasks import make_task
    from switchagg.workers.train import TrainConfig, train
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)

    def run(before: bool, method: str = "sgd"):
        def worker(c):
            t = make_task("digits", hidden=(16,))
            t.preset = dataclasses.replace(t.preset, weight_decay=1e-2, nesterov=True,
                                           momentum_before_reduce=before)
            state, _ = hook_for(method, collective=c, seed=0)
            return train(t, state, rank=c.rank, world_size=2,
                         config=TrainConfig(max_steps=8, epochs=1, seed=0))
        return LocalGroup(2).run(worker, timeout=120)
    after, before = run(False), run(True)
    assert before[0]["params_digest"] == before[1]["params_digest"]
    assert before[0]["evaluation"]["loss"] == pytest.approx(after[0]["evaluation"]["loss"],
                                                            rel=1e-5)
    ints = run(True, "intsgd-determ")     # the IntSGD ResNet recipe's rounding, through a codec
    assert ints[0]["params_digest"] == ints[1]["params_digest"]
    assert ints[0]["evaluation"]["loss"] == pytest.approx(after[0]["evaluation"]["loss"], rel=0.05)


def test_rounds_count_what_was_sent():
    import torch.distributed as tdist

    from switchagg.collectives.torchdist import TorchCollective
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    c = TorchCollective()
    before = c.stats.snapshot()
    c.allgather(np.arange(3, dtype=np.int32))      # the lengths, then the padded data: two calls
    c.allreduce_int(np.arange(3, dtype=np.int32))  # one
    c.allreduce_int_stream(np.zeros(1, np.int8),   # emulated look-ahead: a MAX, then the SUM
                           lambda c0, c1, e: np.zeros((c1 - c0) * c.k, np.int32))
    assert c.stats.since(before).rounds == 2 + 1 + 2
    # in-process: the same count for the heuristic (exponents, then values) and IntSGD (one SUM)
    tels = _run("heuristic-switchml", steps=2)[0]
    assert [t.rounds for _, t, _ in tels] == [2, 2]
    tels = _run("intsgd-random", steps=3)[0]
    assert [t.rounds for _, t, _ in tels] == [2, 1, 1]


A5A = os.environ.get("SWITCHAGG_A5A", "/work/shared/data/a5a")


@pytest.mark.skipif(not os.path.exists(A5A), reason="the a5a LIBSVM file is absent (SWITCHAGG_A5A)")
def test_logreg_reads_the_papers_a5a_file():
    from switchagg.workers.tasks import make_task
    task = make_task("logreg", data=A5A)
    # 123 features, the last never set in this split (the file gives the highest index used)
    assert task.a.shape[0] == 6414 and task.a.shape[1] in (122, 123)
    assert set(np.unique(task.b)) == {-1.0, 1.0}
    assert np.allclose(np.linalg.norm(task.a, axis=1), 1.0)            # rows L2-normalized
    s0, s1 = task.shard(0, 12, 0), task.shard(1, 12, 0)                 # the paper's 12 workers
    n0 = len(s0.x)                                                      # contiguous, in file order
    assert n0 in (534, 535) and np.allclose(s0.x.numpy(), task.a[:n0])
    assert np.allclose(s1.x[:1].numpy(), task.a[n0:n0 + 1])
    assert task.describe()["f_star"] is not None and task.evaluate(task.build_model())["loss"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float_sq_norm_same_bits_on_cuda_and_cpu():
    # The point of float_sq_norm: IntDIANA's alpha agrees across workers whatever their device.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(3_000_001) * 2.0 ** rng.integers(-30, 30, 3_000_001)).astype(np.float32)
    cpu = torch.from_numpy(x)
    assert float_sq_norm(cpu) == float_sq_norm(cpu.cuda())
    assert float_sq_norm(cpu[:10], cpu[10:]) == float_sq_norm(cpu[:10].cuda(), cpu[10:].cuda())
