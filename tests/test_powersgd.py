"""powersgd: the codec gives torch's own powerSGD_hook's numbers, and PowerSGD's algebra (§13.4).

The hook runs in real DDP (tests/powersgd_worker.py) on a process-wide group of one rank, and on
two gloo processes; the codec replays the same bucket inputs through the in-process Reducer (a
group of as many), so both see identical gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import PYTHON, REPO, free_port
from switchagg.collectives import LocalGroup
from switchagg.methods import make_method

sys.path.insert(0, os.path.dirname(__file__))
from powersgd_worker import CODEC_OPTIONS, torch_run  # noqa: E402

WORKER = os.path.join(REPO, "tests", "powersgd_worker.py")


@pytest.fixture(autouse=True, scope="module")
def _own_process_group():
    """The process-wide group of one rank these tests make is gone again after the module
    (tests/test_ddp.py initializes its own)."""
    fresh = not dist.is_initialized()
    yield
    if fresh and dist.is_initialized():
        dist.destroy_process_group()


def _one_rank_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _replay(logs):
    """The codec through the Reducer on the same inputs (one log per rank); outputs per step."""
    def worker(collective):
        method = make_method("powersgd", collective, **CODEC_OPTIONS)
        outs = []
        for k, buckets in enumerate(logs[collective.rank]):
            assert [b[0] for b in buckets] == list(range(len(buckets)))
            grads = []
            for _, shapes, inp, _ in buckets:
                at = 0
                for shape in shapes:
                    n = int(torch.Size(shape).numel())
                    grads.append(inp[at:at + n].view(shape))
                    at += n
            reduced, tel = method.reduce(grads, step=k, lr=0.1,
                                         split=[len(b[1]) for b in buckets])
            outs.append((torch.cat([r.reshape(-1) for r in reduced]), tel))
        return outs
    return LocalGroup(len(logs)).run(worker)


def _check(logs, outs) -> None:
    for rank, (log, rank_outs) in enumerate(zip(logs, outs)):
        for k, (buckets, (ours, tel)) in enumerate(zip(log, rank_outs)):
            theirs = torch.cat([b[3] for b in buckets])
            assert torch.equal(ours, theirs), \
                f"rank {rank} step {k}: max diff {(ours - theirs).abs().max()}"
            if k >= 2:
                assert not torch.equal(ours, torch.cat([b[2] for b in buckets]))  # compressed
                assert tel.rounds == 2 * len(buckets)


def test_powersgd_equals_torchs_hook_bit_for_bit():
    _one_rank_group()
    logs = [torch_run(6)]
    _check(logs, _replay(logs))


@pytest.mark.slow
def test_powersgd_equals_torchs_hook_on_two_gloo_ranks(spawn, tmp_path):
    port = free_port()
    procs = [spawn([PYTHON, WORKER, str(tmp_path), "6"],
                   env={"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=150) for p in procs]
    assert all('"ok": true' in out for out, _ in outputs), [err[-2000:] for _, err in outputs]
    logs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _check(logs, _replay(logs))     # two ranks: gloo's a + b equals the in-process a + b


def test_powersgd_recovers_a_low_rank_matrix_exactly_and_tracks_the_error():
    torch.manual_seed(3)
    m = torch.randn(40, 2) @ torch.randn(2, 30)       # rank 2 <= r
    v = torch.randn(30)

    def worker(collective):
        method = make_method("powersgd", collective, seed=1, start_iter=2)
        return [method.reduce([m, v], step=k, lr=0.1)[0] for k in range(4)]

    outs = LocalGroup(1).run(worker)[0]
    for out_m, out_v in outs[2:]:
        assert torch.allclose(out_m, m, atol=1e-4) and torch.equal(out_v, v)


def test_powersgd_error_feedback_identity_on_two_workers():
    torch.manual_seed(4)
    grads = [torch.randn(20, 16), torch.randn(20, 16)]

    def worker(collective):
        method = make_method("powersgd", collective, seed=2, start_iter=2)
        total = torch.zeros(20, 16)
        for k in range(8):
            out = method.reduce([grads[collective.rank]], step=k, lr=0.1)[0][0]
            if k >= 2:
                total += out
        return total, method.codec.errors[0].view(20, 16)

    (t0, e0), (t1, e1) = LocalGroup(2).run(worker)
    assert torch.equal(t0, t1)
    # sum_w e_w = sum_w (g_w + e_w_old) - n output, telescoped over the compressed steps
    expect = 6 * (grads[0] + grads[1]) - 2 * t0
    assert torch.allclose(e0 + e1, expect, atol=1e-4)
