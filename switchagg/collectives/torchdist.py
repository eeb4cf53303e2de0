"""The collective over torch.distributed (gloo on CPU, nccl on GPU).

What it owns: mapping the `Collective` primitives onto an initialized default (or given) process
group. What it must never do: initialize or destroy the process group (the caller owns it), or sum
int32 in a way whose overflow is undefined.

How it works: arrays are wrapped as torch tensors on the group's device (CPU for gloo, the current
CUDA device for nccl), reduced, and copied back to numpy. The int32 SUM must wrap exactly like the
switch. NCCL's signed-integer Sum runs the unsigned kernel (NVIDIA/nccl #1832), so int32 wraps
modulo 2^32 by definition and is used as is. Gloo sums int32 with plain C++ `+`, whose overflow is
undefined behaviour (it happens to wrap on x86 today), and it has no uint32; so on gloo the sum is
done exactly in int64 and wrapped to int32 afterwards (`int_wire="int64"`, twice the bytes, counted
as such). Wraps are counted from the exact int64 sum (final value only: torch exposes no partial
sums). Timeouts are the process group's (`init_process_group(timeout=...)`).

Accounting: bytes are the payload this rank hands to the backend (no packets; a ring all-reduce
moves about 2 (n-1)/n of that per rank, which is not counted here).
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import torch
import torch.distributed as dist

from switchagg.codecs._base import Sum
from switchagg.collectives._base import Collective, chunks_wrapped, wrap_int32
from switchagg.packet import DEFAULT_K

__all__ = ["TorchCollective"]


class TorchCollective(Collective):
    """A `Collective` over an initialized torch.distributed process group.

    Args:
        group: the process group (None: the default group).
        device: where tensors are reduced (default: CUDA for nccl, CPU otherwise).
        k: values per packet (look-ahead chunking and wrap accounting).
        int_wire: "int32" (exact wrap by the backend: nccl) or "int64" (sum exactly, wrap here:
            gloo); default chosen from the backend.
    """

    kind = "torch"

    def __init__(self, group=None, *, device: torch.device | str | None = None,
                 k: int = DEFAULT_K, int_wire: str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchCollective needs torch.distributed.init_process_group() first")
        super().__init__(dist.get_rank(group), dist.get_world_size(group), k=k)
        self.group = group
        backend = dist.get_backend(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.int_wire = int_wire or ("int32" if backend == "nccl" else "int64")
        if self.int_wire not in ("int32", "int64"):
            raise ValueError(f"int_wire must be 'int32' or 'int64', got {self.int_wire!r}")

    # -- codec payloads: a Sum stays on its device and runs asynchronously ------------------------

    def _launch(self, payload) -> concurrent.futures.Future:
        if not isinstance(payload, Sum):
            return super()._launch(payload)   # Stream (MAX round, then SUM) and Gather: blocking
        values = payload.values
        if not isinstance(values, torch.Tensor):
            return super()._launch(payload)
        self._stats.calls += 1
        self._stats.rounds += 1
        t = values.detach().reshape(-1)
        if t.dtype == torch.int32 and self.int_wire == "int64":
            wire = t.to(device=self.device, dtype=torch.int64)
        elif t.dtype in (torch.int32, torch.float32):
            wire = t.to(self.device, copy=True)
        else:
            raise TypeError(f"Sum payloads are int32 or float32, got {t.dtype}")
        self._stats.bytes_sent += wire.numel() * wire.element_size()
        self._stats.bytes_received += wire.numel() * wire.element_size()
        work = dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def finish(done) -> None:
            try:
                done.value()  # raises the backend's error, if any
                out = wire
                if wire.dtype == torch.int64:
                    exact = wire.cpu().numpy() if wire.device.type != "cpu" else wire.numpy()
                    self._stats.wraps += chunks_wrapped(exact[None, :], self.k)
                    out = torch.from_numpy(wrap_int32(exact))
                fut.set_result(out.to(t.device))
            except BaseException as exc:  # handed to whoever waits on the Future
                fut.set_exception(exc)

        work.get_future().add_done_callback(finish)
        return fut

    def _tensor(self, values: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.from_numpy(np.array(values, dtype=dtype, copy=True))
        self.stats.bytes_sent += t.numel() * t.element_size()
        self.stats.bytes_received += t.numel() * t.element_size()
        return t.to(self.device)

    def _sum_int(self, values: np.ndarray) -> np.ndarray:
        if self.int_wire == "int32":
            t = self._tensor(values)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            return t.cpu().numpy()
        t = self._tensor(values, np.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        exact = t.cpu().numpy()
        self.stats.wraps += chunks_wrapped(exact[None, :], self.k)
        return wrap_int32(exact)

    def _max(self, values: np.ndarray) -> np.ndarray:
        t = self._tensor(values)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.cpu().numpy()

    def _sum_float(self, values: np.ndarray) -> np.ndarray:
        t = self._tensor(values)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()

    def _gather(self, values: np.ndarray) -> list[np.ndarray]:
        # Lengths may differ per rank: gather them first, pad to the longest, trim after. That is
        # a round of its own on the wire (allgather counted the data's): count it.
        length = torch.tensor([values.size], dtype=torch.int64, device=self.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length, group=self.group)
        self._stats.rounds += 1
        self._stats.bytes_sent += length.numel() * length.element_size()
        self._stats.bytes_received += length.numel() * length.element_size() * self.world_size
        lengths = [int(x.item()) for x in lengths]
        padded = np.zeros(max(lengths), dtype=values.dtype)
        padded[:values.size] = values
        t = self._tensor(padded)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        # _tensor counted one copy in; a rank receives the other n - 1 ranks' copies.
        self.stats.bytes_received += t.numel() * t.element_size() * (self.world_size - 2)
        return [p.cpu().numpy()[:n].copy() for p, n in zip(parts, lengths)]
