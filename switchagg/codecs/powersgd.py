"""powersgd: PowerSGD, rank-r power iteration with error feedback and warm start (Vogels,
Karimireddy, Jaggi, NeurIPS 2019), step for step torch's own `powerSGD_hook`.

Per bucket, after `start_iter` steps of plain averaging (DDP rebuilds its buckets after step 0):
the residual e of the bucket is added (M = g + e); every parameter viewed as an n x m matrix that
torch's `_should_compress` accepts gets P = M Q (Q warm-started from the last step and
re-orthogonalized, or on first use drawn N(0, 1) from a seed of the state's numpy RandomState, as
the hook draws it); round 1 SUMs the P's (with the uncompressed parameters riding along, averaged
exactly); P is orthogonalized (torch's `_orthogonalize`), Q = M^T P, round 2 SUMs the Q's; the
output is P Q^T / n and e <- M - output (the global approximation, as the hook does). Biased; the
error feedback makes it converge. The arithmetic is the hook's own (`bmm` into the same memory
layout, matrices grouped by shape in first-seen order, the same seeds), so it gives torch's numbers
bit for bit (the tests check it against `powerSGD_hook`); state is kept by bucket index like the
hook's, which is why the plain-averaging warm-up must cover DDP's rebuild.

Wire: fp32 P (n r') and Q (m r') per compressed matrix plus the uncompressed parameters, in two
fp32 SUM rounds (torch.distributed; the switch adds int32 only). `paper_bits` = 32 (r'(n + m) per
matrix + numel of the others), the same as what is sent.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (
    _orthogonalize, _should_compress,
)

from switchagg.codecs._base import Bucket, Codec, Sum

__all__ = ["PowerSGD"]


@dataclass
class _Round:
    index: int
    inp: torch.Tensor          # M = g + e, decoded into in place
    copy: torch.Tensor | None  # M before decoding (for the residual)
    matrices: list             # (1, n, m) views of inp, grouped by shape
    ps: list
    qs: list
    uncompressed: list         # views of inp
    plain: bool = False


class PowerSGD(Codec):
    """PowerSGD as torch's `powerSGD_hook` computes it (layer-wise, not batched).

    Args:
        matrix_rank: r, the rank of the approximation (default 2).
        start_iter: steps of plain fp32 averaging first (>= 2 with error feedback or warm start).
        min_compression_rate: compress a matrix only if n m > rate (n + m) r'.
        error_feedback, warm_start: as the hook's use_error_feedback and warm_start.
        eps: orthogonalization epsilon (the hook's orthogonalization_epsilon; > 0 keeps an
            all-zero column finite).
        seed: the RandomState seed of the Q draws (the hook's random_seed).
    """

    needs = ("sum",)
    wire_dtype = "float32"
    unbiased = False

    def __init__(self, *, matrix_rank: int = 2, start_iter: int = 2,
                 min_compression_rate: float = 2.0, error_feedback: bool = True,
                 warm_start: bool = True, eps: float = 1e-8, **common) -> None:
        super().__init__(**common)
        if matrix_rank < 1:
            raise ValueError(f"matrix_rank={matrix_rank!r}: expected >= 1")
        if (error_feedback or warm_start) and start_iter <= 1:
            raise ValueError(f"start_iter={start_iter!r}: with error feedback or warm start it "
                             f"must be > 1 (DDP rebuilds its buckets after the first step)")
        self.matrix_rank, self.start_iter = int(matrix_rank), int(start_iter)
        self.min_rate, self.eps = float(min_compression_rate), float(eps)
        self.error_feedback, self.warm_start = bool(error_feedback), bool(warm_start)
        self.rng = np.random.RandomState(self.seed % 2 ** 32)
        self.errors: dict[int, torch.Tensor] = {}
        self.p_memory: dict[int, torch.Tensor] = {}
        self.q_memory: dict[int, torch.Tensor] = {}

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Sum:
        if self.step < self.start_iter:
            with self._lock:
                self.tel.paper_bits += 32 * x.numel()
            return Sum(torch.div(x.to(torch.float32), self.n), _Round(bucket.index, x, None,
                                                                      [], [], [], [], plain=True))
        index = bucket.index
        inp = x.to(torch.float32).clone()
        if self.error_feedback:
            if index in self.errors:
                inp.add_(self.errors[index])
            else:
                self.errors[index] = torch.zeros_like(inp)
        copy = inp.clone() if self.error_feedback else None
        to_compress, uncompressed, p_size, q_size = [], [], 0, 0
        for b in bucket.blocks:
            view = inp[b.start:b.stop].view(b.shape if b.shape else (b.numel,))
            if view.dim() == 0 or view.numel() == 0:
                uncompressed.append(view)
                continue
            matrix = view.view(view.shape[0], -1)
            n, m = matrix.shape
            r = min(n, m, self.matrix_rank)
            if _should_compress(n, m, r, self.min_rate)[0]:
                to_compress.append(matrix)
                p_size, q_size = p_size + n * r, q_size + m * r
            else:
                uncompressed.append(view)
        for memory in (self.p_memory, self.q_memory, self.errors):   # after a CPU checkpoint
            if index in memory and memory[index].device != x.device:
                memory[index] = memory[index].to(x.device)
        randomize = not self.warm_start or index not in self.p_memory
        if randomize:
            self.p_memory[index] = torch.empty(p_size, device=x.device)
            self.q_memory[index] = torch.empty(q_size, device=x.device)
        by_shape = defaultdict(list)
        for matrix in to_compress:
            by_shape[matrix.shape].append(matrix)
        matrices, ps, qs, pi, qi = [], [], [], 0, 0
        for group in by_shape.values():
            for matrix in group:
                n, m = matrix.shape
                r = min(n, m, self.matrix_rank)
                matrices.append(matrix.unsqueeze(0))
                ps.append(self.p_memory[index][pi:pi + n * r].view(1, n, r))
                qs.append(self.q_memory[index][qi:qi + m * r].view(1, m, r))
                pi, qi = pi + n * r, qi + m * r
        if not randomize:
            for q in qs:
                _orthogonalize(q, self.eps)
        else:
            gen = torch.Generator().manual_seed(int(self.rng.randint(1_000_000_000)))
            for q in qs:
                q.copy_(torch.randn(*q.shape, generator=gen, device="cpu"))
                _orthogonalize(q, self.eps)
        for matrix, q, p in zip(matrices, qs, ps):
            torch.bmm(matrix, q, out=p)
        flat_unc = (torch.cat([t.reshape(-1) for t in uncompressed]) if uncompressed
                    else inp.new_zeros(0))
        rnd = _Round(index, inp, copy, matrices, ps, qs, uncompressed)
        with self._lock:
            self.tel.paper_bits += 32 * (flat_unc.numel() + p_size + q_size)
        return Sum(torch.cat([flat_unc, self.p_memory[index]]), rnd,
                   then=lambda summed: self._after_p(summed, rnd, flat_unc.numel()))

    def _after_p(self, summed: torch.Tensor, rnd: _Round, n_unc: int) -> Sum:
        unc = summed[:n_unc].to(rnd.inp.device).div_(self.n)
        at = 0
        for t in rnd.uncompressed:
            t.copy_(unc[at:at + t.numel()].view_as(t))
            at += t.numel()
        self.p_memory[rnd.index].copy_(summed[n_unc:])
        for p in rnd.ps:
            _orthogonalize(p, self.eps)
        for matrix, p, q in zip(rnd.matrices, rnd.ps, rnd.qs):
            torch.bmm(matrix.transpose(1, 2), p, out=q)
        return Sum(self.q_memory[rnd.index], rnd)

    def decode(self, reduced, rnd: _Round, out: torch.Tensor) -> None:
        with self._lock:
            self.tel.scaling = "float"
        if rnd.plain:
            out.copy_(reduced)
            return
        q_mem = self.q_memory[rnd.index]
        q_mem.copy_(reduced)
        q_mem.div_(self.n)
        for p, q, matrix in zip(rnd.ps, rnd.qs, rnd.matrices):
            torch.bmm(p, q.transpose(1, 2), out=matrix)
        if self.error_feedback:
            self.errors[rnd.index] = rnd.copy - rnd.inp
        if not self.warm_start:
            self.p_memory.clear()
            self.q_memory.clear()
        out.copy_(rnd.inp)

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"errors": cpu(self.errors), "p_memory": cpu(self.p_memory),
                "q_memory": cpu(self.q_memory), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for name in ("errors", "p_memory", "q_memory"):
            setattr(self, name, {int(k): v.clone() for k, v in state[name].items()})
        self.rng.set_state(state["rng"])
