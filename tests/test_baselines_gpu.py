"""The baselines on CUDA tensors (skipped without a device): every codec runs on the gradient's
device, its floats never cross to the host (only packed bytes do, for the gather), replicas agree
and the average is close to the true one."""

from __future__ import annotations

import pytest
import torch

from switchagg.collectives import LocalGroup
from switchagg.collectives._base import HOST_TRANSFERS
from switchagg.methods import make_method

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to torch", allow_module_level=True)

GATHER = ["qsgd-4bit", "qsgd-8bit", "natsgd", "terngrad", "onebit-ef", "isgq-mse",
          "isgq-dithered"]


@pytest.mark.parametrize("name", GATHER + ["terngrad-switch", "powersgd"])
def test_baseline_on_cuda(name):
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(64, 32, generator=g).cuda(), torch.randn(32, generator=g).cuda()]
             for _ in range(2)]
    HOST_TRANSFERS.clear()

    def worker(collective):
        method = make_method(name, collective, seed=1)
        outs = [method.reduce(grads[collective.rank], step=k, lr=0.1)[0] for k in range(3)]
        return outs[-1]

    a, b = LocalGroup(2).run(worker)
    assert all(x.is_cuda and torch.equal(x, y) for x, y in zip(a, b))
    mean = [(p + q) / 2 for p, q in zip(*grads)]
    err = sum(float(((x - m) ** 2).sum()) for x, m in zip(a, mean))
    assert err < 3 * sum(float((m ** 2).sum()) for m in mean)
    if name in GATHER:
        assert set(HOST_TRANSFERS) <= {"uint8"}, dict(HOST_TRANSFERS)
