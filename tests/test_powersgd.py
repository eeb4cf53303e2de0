"""powersgd: the codec gives torch's own powerSGD_hook's numbers, and PowerSGD's algebra (§13.4).

The hook runs in real DDP on a process-wide group of one rank; the codec replays the same bucket
inputs through the in-process Reducer (a group of one), so both see identical gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
from torch.nn.parallel import DistributedDataParallel

from switchagg.collectives import LocalGroup
from switchagg.methods import make_method


def _one_rank_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24),
                               torch.nn.ReLU(), torch.nn.Linear(24, 3))


def _torch_run(steps: int, **options):
    """Per step, per bucket: (bucket index, param shapes, input, torch's output)."""
    _one_rank_group()
    model = _model()
    ddp = DistributedDataParallel(model)
    state = ps.PowerSGDState(process_group=None, **options)
    log: list[list] = []

    def hook(st, bucket):
        entry = [bucket.index(), [tuple(p.shape) for p in bucket.parameters()],
                 bucket.buffer().clone()]
        log[-1].append(entry)
        return ps.powerSGD_hook(st, bucket).then(lambda f: entry.append(f.value().clone())
                                                 or f.value())

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        log.append([])
        x = torch.randn(16, 12, generator=g)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    return log


def _replay(log, **options):
    """The codec through the Reducer on the same inputs; returns its outputs per step."""
    def worker(collective):
        method = make_method("powersgd", collective, **options)
        outs = []
        for k, buckets in enumerate(log):
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
    return LocalGroup(1).run(worker)[0]


def test_powersgd_equals_torchs_hook_bit_for_bit():
    opts = dict(matrix_approximation_rank=2, start_powerSGD_iter=2, min_compression_rate=2,
                use_error_feedback=True, warm_start=True, orthogonalization_epsilon=1e-8,
                random_seed=7)
    log = _torch_run(6, **opts)
    outs = _replay(log, seed=7, matrix_rank=2, start_iter=2, eps=1e-8)
    for k, (buckets, (ours, tel)) in enumerate(zip(log, outs)):
        theirs = torch.cat([b[3] for b in buckets])
        assert torch.equal(ours, theirs), f"step {k}: max diff {(ours - theirs).abs().max()}"
        if k >= 2:
            assert not torch.equal(ours, torch.cat([b[2] for b in buckets]))  # compressed
            assert tel.rounds == 2 * len(buckets)


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
