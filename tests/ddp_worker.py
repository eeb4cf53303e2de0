"""A DDP rank for tests/test_ddp.py: train a tiny quadratic model several ways, save what happened.

Usage (rank and rendezvous from the environment, as torchrun sets them: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT):

    python tests/ddp_worker.py SWITCH_ADDRESS OUT_DIR RUN[,RUN...] [STEPS]

Runs, all in one process group, each from the same initial parameters on the same per-rank data:
  local     no DDP: this rank's own gradients (what noop must reproduce)
  ref       DDP with its built-in fp32 all-reduce (no hook)
  noop      DDP + noop_hook
  random, determ, determ2, block, switchml
            DDP + the switch hooks (determ2 repeats determ with a fresh state and job)
  m:NAME    DDP + `hook_for(NAME)` (any registered method), recording every bucket's input and
            averaged output, its iteration, block keys and sizes (for the cross-driver replay)

The model is three linear maps on separate inputs under a squared loss, so the averaged loss is
quadratic (its gradient affine in the parameters); test_ddp.py's tolerances rely on that. A tiny
bucket_cap_mb makes DDP cut the 207 parameters into three buckets after its rebuild.
Writes OUT_DIR/rank{R}.pt: {run: {"params": [...], "alpha": [...], "gmax": [...],
"buckets": [(iteration, index, numel)]}} and, after `determ`, OUT_DIR/state{R}.pkl (the pickled
state). With DDP_WORKER_LEAVE_OPEN set, the states are never closed. Prints one JSON line {"ok": true} or {"ok": false, "error": ..., "message": ...}.
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations as objects.
import json
import os
import pickle
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from switchagg import ClientConfig
from switchagg.ddp import (
    IntSGDState, codec_hook, hook_for, intsgd_block_hook, intsgd_hook, noop_hook, switchml_hook,
)

LR = 0.05
BATCH = 32
#: 52 bytes: after its rebuild DDP closes a bucket once it holds that much, so each head's
#: weight and bias become one bucket (18, 39 and 150 elements); iteration 0 has one bucket.
BUCKET_CAP_MB = 0.00005
CONFIG = ClientConfig(k=8, slots=16, burst=8, join_timeout=20, op_timeout=20,
                      rto_initial=0.05, rto_min=0.02)
#: Set (to anything) to skip `state.close()`, as a script that forgets it does: the client must
#: still LEAVE, at interpreter exit.
LEAVE_OPEN = "DDP_WORKER_LEAVE_OPEN"
HOOKS = {"random": (intsgd_hook, "random"), "determ": (intsgd_hook, "deterministic"),
         "determ2": (intsgd_hook, "deterministic"), "block": (intsgd_block_hook, "random"),
         "switchml": (switchml_hook, "random")}


class Heads(torch.nn.Module):
    """y_i = A_i x_i + b_i for three heads: 150 + 39 + 18 = 207 parameters in 6 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(24, 6), torch.nn.Linear(12, 3),
                                          torch.nn.Linear(8, 2)])

    def forward(self, xs):
        return [head(x) for head, x in zip(self.heads, xs)]


def data(rank: int):
    """This rank's inputs and targets, one pair per head."""
    g = torch.Generator().manual_seed(1000 + rank)
    xs = [torch.randn(BATCH, n, generator=g) for n in (24, 12, 8)]
    return xs, [torch.randn(BATCH, m, generator=g) * 3 for m in (6, 3, 2)]


def train(run: str, rank: int, address: str, steps: int, out_dir: str) -> dict:
    torch.manual_seed(0)
    model = Heads()
    net, state, buckets = model, None, []
    if run != "local":
        net = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    if run == "noop":
        net.register_comm_hook(None, noop_hook)
    elif run.startswith("m:"):
        state, _ = hook_for(run[2:], switch=address, job=run, lr=LR, seed=7, config=CONFIG)

        def recording_codec_hook(st, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            iteration, inp = st.iteration, bucket.buffer().clone()
            fut = codec_hook(st, bucket)
            position = st._index - 1   # launch order within the iteration
            keys = [st._keys[id(p)] for p in bucket.parameters()]
            sizes = [p.numel() for p in bucket.parameters()]

            def record(done: torch.futures.Future) -> torch.Tensor:
                out = done.value()
                buckets.append({"iteration": iteration, "position": position, "keys": keys,
                                "sizes": sizes,
                                "input": inp, "output": out.clone()})
                return out

            return fut.then(record)

        net.register_comm_hook(state, recording_codec_hook)
    elif run in HOOKS:
        hook, rounding = HOOKS[run]
        state = IntSGDState(address, job=run, rounding=rounding, lr=LR, seed=7, config=CONFIG)

        def recording_hook(st, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            buckets.append((st.iteration, bucket.index(), bucket.buffer().numel()))
            return hook(st, bucket)

        net.register_comm_hook(state, recording_hook)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xs, targets = data(rank)
    alphas, gmax = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(y, t) for y, t in zip(net(xs), targets))
        loss.backward()
        alphas.append(None if state is None or state.alpha is None else state.alpha.tolist())
        gmax.append(max(float(p.grad.abs().max()) for p in model.parameters()))
        opt.step()
    next_alpha = None
    if state is not None:
        if run == "m:heuristic-global":   # a user's script can read each step's telemetry
            assert state.step_telemetry().scaling == "global-exponent"
        if run == "determ":
            with open(os.path.join(out_dir, f"state{rank}.pkl"), "wb") as f:
                pickle.dump(state, f)  # folds the last step into r first
            next_alpha = state._scaler.alpha(LR).tolist()
        if not os.environ.get(LEAVE_OPEN):
            state.close()
    return {"params": [p.detach().clone() for p in model.parameters()], "alpha": alphas,
            "gmax": gmax, "buckets": buckets, "next_alpha": next_alpha}


def main() -> int:
    address, out_dir, runs = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        results = {run: train(run, rank, address, steps, out_dir) for run in runs}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        print(json.dumps({"ok": True}), flush=True)
        return 0
    except Exception as exc:  # reported to the test, which shows it
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}),
              flush=True)
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
