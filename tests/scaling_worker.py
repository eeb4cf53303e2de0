"""One worker process for tests/test_scaling_collectives.py: every method over torch or the switch.

Usage: python tests/scaling_worker.py torch|switch ADDRESS WORLD RANK [methods|primitives]
ADDRESS: for torch a tcp://127.0.0.1:PORT rendezvous; for switch the switch's endpoint.
The last stdout line is JSON {method: [hex float32 bytes of the averaged gradient, per step]}
(integer methods only over the switch). Inputs come from `scaling_inputs`, so the test can rerun
the same workers over LocalCollective in process and compare bit for bit.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

K, SLOTS, STEPS = 8, 8, 4
LRS = [0.1, 0.1, 0.1, 0.05]
INT_METHODS = ["intsgd-random", "intsgd-determ", "intsgd-block", "intdiana",
               "heuristic-switchml", "heuristic-global"]


def scaling_inputs(rank: int, step: int) -> list[torch.Tensor]:
    """Worker `rank`'s gradients at `step`: two tensors of different scales (182 values, 23 chunks)."""
    rng = np.random.default_rng([7, rank, step])
    a = rng.standard_normal(37).astype(np.float32) * np.float32(3.0)
    b = (rng.standard_normal((5, 29)) * 1e-3 + 0.01 * rank).astype(np.float32)
    return [torch.from_numpy(a), torch.from_numpy(b)]


def run_methods(collective, methods: list[str]) -> dict:
    from switchagg.methods import make_method
    out = {}
    for name in methods:
        method = make_method(name, collective, seed=3, bits=32)
        hexes = []
        for step in range(STEPS):
            avg, _ = method.reduce(scaling_inputs(collective.rank, step), step=step, lr=LRS[step])
            hexes.append(torch.cat([t.reshape(-1) for t in avg]).numpy().tobytes().hex())
        out[name] = hexes
    return out


def primitives(collective) -> dict:
    """Each collective primitive on inputs that stress it; results as JSON-able lists."""
    rank = collective.rank
    rng = np.random.default_rng([9, rank])
    extremes = np.array([2**31 - 1, -2**31, 1, -1, 0, 2**30] * 7, np.int32)  # 42: 6 chunks of 8
    out = {"sum_int": collective.allreduce_int(extremes).tolist(),
           "wraps": collective.stats.wraps,
           "max_int8": collective.allreduce_max(np.array([rank - 128, 5 * rank, -3], np.int8)).tolist()}
    exps = rng.integers(-20, 20, 23).astype(np.int8)          # 23 chunks: > SLOTS, pipelined path
    seen = []

    def encode(first, stop, max_exp):
        seen.append(max_exp.tolist())
        return (np.arange(first * K, stop * K) % 1000 * (rank + 1) + max_exp.repeat(K)).astype(np.int32)
    sums, max_exp = collective.allreduce_int_stream(exps, encode)
    out.update(stream_sum=sums.tolist(), stream_max=max_exp.tolist(),
               encode_saw=[e for part in seen for e in part])
    short, _ = collective.allreduce_int_stream(exps[:5], encode)  # <= SLOTS chunks: two calls
    out["short_stream_sum"] = short.tolist()
    if collective.kind != "switch":
        out["sum_float"] = collective.allreduce_float(np.full(5, 0.25 * (rank + 1), np.float32)).tolist()
        out["gather"] = [a.tolist() for a in collective.allgather(np.arange(rank + 1, dtype=np.int64))]
    return out


def main() -> None:
    kind, address, world, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    what = sys.argv[5] if len(sys.argv) > 5 else "methods"
    if kind == "torch":
        import torch.distributed as dist
        from datetime import timedelta
        from switchagg.collectives import TorchCollective
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world,
                                timeout=timedelta(seconds=30))
        try:
            c = TorchCollective(k=K)
            result = primitives(c) if what == "primitives" else run_methods(c, ["sgd", *INT_METHODS])
        finally:
            dist.destroy_process_group()
    else:
        from switchagg import ClientConfig, SwitchClient
        from switchagg.collectives import SwitchCollective
        config = ClientConfig(k=K, slots=SLOTS, burst=4, join_timeout=20, op_timeout=20,
                              rto_min=0.01)
        with SwitchClient(address, "scaling", world, rank, config=config) as client:
            c = SwitchCollective(client)
            result = primitives(c) if what == "primitives" else run_methods(c, INT_METHODS)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
