"""Train a small classifier with PyTorch DDP, each gradient bucket reduced by a switchagg method.

    switch-emulator --bind tcp://127.0.0.1:5555 &
    torchrun --standalone --nproc-per-node 2 workers/examples/ddp_hook.py --switch tcp://127.0.0.1:5555
    torchrun --standalone --nproc-per-node 2 workers/examples/ddp_hook.py --method intdiana

The only switchagg lines are `hook_for` and `register_comm_hook` (marked below); the rest is an
ordinary DDP script. Methods the switch can sum go through it; the others (sgd) use gloo. Every rank trains on its own shard of a synthetic 10-class problem (an MLP on
32 features), prints the loss every few steps, and at the end checks that all ranks hold the same
parameters (the hook averages, so they must agree bit for bit).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from switchagg.ddp import hook_for
from switchagg.methods import METHODS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--switch", default=os.environ.get("SWITCH_ADDR", "tcp://127.0.0.1:5555"),
                        help="the switch's endpoint (default $SWITCH_ADDR or %(default)s)")
    parser.add_argument("--method", choices=list(METHODS), default="intsgd-random")
    parser.add_argument("--bits", type=int, choices=[8, 16, 32], default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--job", default="ddp-example")
    parser.add_argument("--timeout", type=float, default=30.0, help="switch join/op timeout (s)")
    return parser.parse_args()


def shard(rank: int, n: int = 256):
    """This rank's samples of a fixed random linear 10-class problem."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 10, generator=g)
    g.manual_seed(1 + rank)
    x = torch.randn(n, 32, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model everywhere (DDP would broadcast it anyway)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    # switchagg: one state per rank, the same settings everywhere; the client joins on backward().
    state, hook = hook_for(args.method, switch=args.switch, job=args.job, bits=args.bits,
                           lr=lambda: optimizer.param_groups[0]["lr"], timeout=args.timeout)
    model.register_comm_hook(state, hook)

    x, y = shard(rank)
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        tel = state.step_telemetry()   # this step's integers, scale, bytes and time split
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f} scaling {tel.scaling} "
                  f"max|sum| {tel.max_abs_sum} clipped {tel.clipped} sent {tel.bytes_sent} B",
                  flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    agree = all(torch.equal(c, flat) for c in copies)
    if rank == 0:
        print("ranks agree" if agree else "RANKS DISAGREE", flush=True)
    state.close()
    dist.destroy_process_group()
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
