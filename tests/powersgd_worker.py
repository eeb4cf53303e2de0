"""torch's own powerSGD_hook in real DDP, recording every bucket's input and output per step.

Imported by tests/test_powersgd.py (a process-wide group of one rank), or run as a script by it
for two ranks over gloo: `python tests/powersgd_worker.py OUT STEPS` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; it writes OUT/rank<r>.pt (the log) and prints {"ok": true}.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
from torch.nn.parallel import DistributedDataParallel

OPTIONS = dict(matrix_approximation_rank=2, start_powerSGD_iter=2, min_compression_rate=2,
               use_error_feedback=True, warm_start=True, orthogonalization_epsilon=1e-8,
               random_seed=7)
#: The same settings in the codec's names.
CODEC_OPTIONS = dict(seed=7, matrix_rank=2, start_iter=2, eps=1e-8)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24),
                               torch.nn.ReLU(), torch.nn.Linear(24, 3))


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(1000 * rank + step))


def torch_run(steps: int, rank: int = 0) -> list[list]:
    """Per step, per bucket: [bucket index, parameter shapes, input, torch's output]."""
    net = model()
    ddp = DistributedDataParallel(net)
    state = ps.PowerSGDState(process_group=None, **OPTIONS)
    log: list[list] = []

    def hook(st, bucket):
        entry = [bucket.index(), [tuple(p.shape) for p in bucket.parameters()],
                 bucket.buffer().clone()]
        log[-1].append(entry)
        return ps.powerSGD_hook(st, bucket).then(lambda f: entry.append(f.value().clone())
                                                 or f.value())

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for k in range(steps):
        log.append([])
        opt.zero_grad()
        ddp(batch(rank, k)).pow(2).mean().backward()
        opt.step()
    return log


def main(out: str, steps: int) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(torch_run(steps, rank), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
