"""Every baseline gives the same bits through the DDP hook as through the in-process Reducer.

Real DDP on threads (a process-wide group of one rank for DDP's bookkeeping; the hook reduces over
an in-process group of two, as tests/test_train.py does), small buckets so that a step has several;
the Reducer then gets the same local gradients and must return the DDP run's averages bit for bit.
The per-parameter codecs key their random streams and state by the parameter (DDP's keys are the
parameters' first-seen order, here `model.parameters()` order, which the Reducer gets in one
bucket); PowerSGD keeps torch's per-bucket state and terngrad-switch's rounding stream is indexed
by the element's offset in the iteration, so they get DDP's bucket order and split.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from switchagg.collectives import LocalGroup
from switchagg.ddp import codec_hook, hook_for
from switchagg.methods import make_method

METHODS = ["qsgd-4bit", "qsgd-8bit", "natsgd", "terngrad", "terngrad-switch", "onebit-ef",
           "powersgd", "isgq-mse", "isgq-dithered"]
STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def _own_process_group():
    """The process-wide group of one rank these tests make is gone again after the module
    (tests/test_ddp.py initializes its own)."""
    fresh = not dist.is_initialized()
    yield
    if fresh and dist.is_initialized():
        dist.destroy_process_group()


_INIT = threading.Lock()   # torch's global generator: threads take turns


def _model() -> torch.nn.Module:
    with _INIT:
        torch.manual_seed(0)
        return _layers()


def _layers() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(6, 10, generator=torch.Generator().manual_seed(100 * step + rank))


def _ddp_run(name: str):
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def worker(collective):
        model = _model()
        index = {id(p): i for i, p in enumerate(model.parameters())}
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.0008)
        state, _ = hook_for(name, collective=collective, seed=3)
        state.attach(model)
        layout: list[list] = []

        def hook(st, bucket):
            layout[-1].append([index[id(p)] for p in bucket.parameters()])
            return codec_hook(st, bucket)

        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        averaged = []
        for k in range(STEPS):
            layout.append([])
            opt.zero_grad()
            ddp(_batch(collective.rank, k)).pow(2).mean().backward()
            state.step_telemetry()
            averaged.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        keys = [state._keys.get(id(p)) for p in model.parameters()]
        return layout, averaged, keys

    return LocalGroup(2).run(worker, timeout=60)


def _reducer_run(name: str, layout):
    def worker(collective):
        model = _model()
        params = list(model.parameters())
        method = make_method(name, collective, seed=3)
        by_bucket = name in ("powersgd", "terngrad-switch")
        if hasattr(method.codec, "attach"):
            method.codec.attach(model)
        opt = torch.optim.SGD(params, lr=0.1)
        out = []
        for k in range(STEPS):
            opt.zero_grad()
            model(_batch(collective.rank, k)).pow(2).mean().backward()
            order = [i for b in layout[k] for i in b] if by_bucket else list(range(len(params)))
            split = [len(b) for b in layout[k]] if by_bucket else None
            reduced, _ = method.reduce([params[i].grad for i in order], step=k, lr=0.1,
                                       split=split)
            for i, r in zip(order, reduced):
                params[i].grad.copy_(r)
            out.append([p.grad.clone() for p in params])
            opt.step()
        return out

    return LocalGroup(2).run(worker, timeout=60)


@pytest.mark.parametrize("name", METHODS)
def test_ddp_hook_and_reducer_agree_bit_for_bit(name):
    ddp = _ddp_run(name)
    layout = ddp[0][0]
    assert max(len(step) for step in layout) > 1          # several buckets per step
    keys = ddp[0][2]
    assert keys == list(range(len(keys))) or set(keys) == {None}   # None: ISGQ's own keys
    reducer = _reducer_run(name, layout)
    for rank in range(2):
        for k in range(STEPS):
            assert len(ddp[rank][1][k]) == len(reducer[rank][k])
            for a, b in zip(ddp[rank][1][k], reducer[rank][k]):
                assert torch.equal(a, b), f"{name} rank {rank} step {k}"
    assert all(torch.equal(a, b) for a, b in zip(ddp[0][1][-1], ddp[1][1][-1]))


def test_method_sets_and_the_wire_columns():
    from test_train import _run
    from switchagg.workers import report
    from switchagg.workers.worker import method_names

    assert method_names("paper-isgq") == ["sgd", "isgq-mse", "isgq-dithered", "onebit-ef",
                                          "terngrad", "qsgd-4bit"]
    assert method_names("paper-intsgd,sgd,natsgd")[-1] == "natsgd"      # each once
    assert len(method_names("all")) == len(method_names(None)) == 17    # 16 codecs + swarmsgd
    with pytest.raises(ValueError, match="paper-intsgd"):
        method_names("paper-nope")
    summaries, _ = _run("terngrad", steps=3)
    merged = report.merge_ranks(summaries, "accuracy")
    numel = merged["coords_per_worker"]
    assert numel == 3 * 17226                                 # the digits MLP, 3 steps
    assert merged["bits_per_coord"] == 8 * merged["bytes_sent_per_worker"] / numel
    # LocalCollective frames every payload in packets of 64 int32 + 16 B: 2-bit codes + scalers
    assert 2.0 < merged["bits_per_coord"] < 2.5 and merged["ratio_vs_fp32"] > 12
    assert merged["paper_bits_per_coord"] == (2 * 17226 + 6 * 32) / 17226
    table = report.format_table({"terngrad": merged})
    assert "b/coord" in table and "x fp32" in table
