"""Per-step cost and integer range of every reduction method, on n simulated workers (prints figures).

Usage: python -m switchagg.workers.bench_methods [--world 4] [--numel 1000000] [--steps 5] [--bits 32]

Each worker's gradient is Gaussian with a per-tensor scale (10 tensors, scales 1e-4 .. 1e0, plus a
per-worker offset so the data are mildly heterogeneous). Reports, averaged over the steps after the
first (IntSGD's first step is the heuristic one): seconds quantizing / communicating / decoding on
worker 0, bytes and packets it sent, rounds, max |Q_i|, bits the sum needed, clip fraction, and the
relative error of the averaged gradient against the exact float64 mean. Times are for this host's
CPU kernels and the in-process LocalCollective (the communication time is thread rendezvous, not a
network); for the wire, run the switch (`switchagg bench`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from switchagg.collectives import LocalGroup
from switchagg.methods import METHODS, make_method


def gradients(rank: int, step: int, numel: int) -> list[np.ndarray]:
    rng = np.random.default_rng([rank, step])
    sizes = np.full(10, numel // 10)
    sizes[-1] += numel - sizes.sum()
    return [(rng.standard_normal(s) * 10.0 ** (i * 4 / 9 - 4) + 1e-3 * rank).astype(np.float32)
            for i, s in enumerate(sizes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bits", type=int, default=32)
    args = parser.parse_args()
    inputs = {(r, s): gradients(r, s, args.numel) for r in range(args.world) for s in range(args.steps)}
    exact = {s: np.concatenate([np.mean([inputs[r, s][i] for r in range(args.world)], axis=0,
                                        dtype=np.float64) for i in range(10)])
             for s in range(args.steps)}
    print(f"world={args.world} numel={args.numel} bits={args.bits} steps={args.steps} (rank 0, "
          f"mean over steps 1..{args.steps - 1})")
    print(f"{'method':20s} {'quant s':>8s} {'comm s':>8s} {'decode s':>8s} {'MB sent':>8s} "
          f"{'packets':>8s} {'rounds':>6s} {'max|Q|':>11s} {'bits':>4s} {'clip':>7s} {'rel err':>9s}")
    for name in METHODS:  # warm-up: JIT-compile every kernel path outside the timings
        warm = make_method(name, LocalGroup(1).member(0))
        for step in range(3):
            warm.reduce([torch.ones(300), torch.ones(5)], step=step, lr=0.1)
    for name in METHODS:
        def worker(c):
            m = make_method(name, c, bits=args.bits)
            rows = []
            for step in range(args.steps):
                grads = [torch.from_numpy(g) for g in inputs[c.rank, step]]
                avg, tel = m.reduce(grads, step=step, lr=0.1)
                flat = torch.cat([a.reshape(-1) for a in avg]).numpy().astype(np.float64)
                err = np.linalg.norm(flat - exact[step]) / np.linalg.norm(exact[step])
                rows.append((tel, err))
            return rows
        started = time.perf_counter()
        rows = LocalGroup(args.world, timeout=600).run(worker)[0][1:]
        t = lambda f: np.mean([f(tel) for tel, _ in rows])  # noqa: E731
        print(f"{name:20s} {t(lambda x: x.t_quantize):8.4f} {t(lambda x: x.t_communicate):8.4f} "
              f"{t(lambda x: x.t_decode):8.4f} {t(lambda x: x.bytes_sent) / 1e6:8.2f} "
              f"{t(lambda x: x.packets_sent):8.0f} {t(lambda x: x.rounds):6.0f} "
              f"{t(lambda x: x.max_abs_q):11.0f} {t(lambda x: x.sum_bits):4.0f} "
              f"{t(lambda x: x.clip_fraction):7.2%} {np.mean([e for _, e in rows]):9.2e}"
              f"   ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
