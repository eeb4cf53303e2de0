"""The in-process driver: one worker's codec over a collective, a whole gradient list per call.

What it owns: running a codec's iteration (begin, encode, the collective call, decode, end) on a
list of gradient tensors, and the step's telemetry (integer range from the codec; wire cost,
rounds and the quantize / communicate / decode split from here). It is what the tests, the method
benchmark and quick experiments use; `switchagg compare` trains through the DDP hook
(`switchagg.ddp`), which drives the same codecs bucket by bucket. What it must never do: hold any
method math (the codec does) or copy floats off the gradients' device.

How it works: the gradients are concatenated on their device into one flat float32 tensor, one
bucket whose blocks are the tensors (block key = position in the list, so per-tensor state such as
IntSGD's Algorithm 2 or IntDIANA's shifts follows the tensors), or the buckets given by `split`
(so a test can replay DDP's bucketing exactly). Each bucket's payload is launched and waited for
in order, decoded into the flat output, and the output split back into tensors with the inputs'
shapes, dtypes and devices.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from switchagg.codecs._base import Bucket, Codec, Stream, check_finite
from switchagg.collectives import Collective
from switchagg.telemetry import StepTelemetry

__all__ = ["Reducer", "timed_stream", "fill_costs"]


def timed_stream(payload, spent: list[float]):
    """The payload, with a Stream's per-chunk encode timed into spent[0] (it runs inside the
    collective call, possibly in another thread, and is quantize time, not communication)."""
    if not isinstance(payload, Stream):
        return payload
    inner = payload.encode

    def encode(c0, c1, max_exponents):
        t0 = time.perf_counter()
        try:
            return inner(c0, c1, max_exponents)
        finally:
            spent[0] += time.perf_counter() - t0

    return Stream(payload.exponents, encode, payload.numel, payload.ctx)


def fill_costs(tel: StepTelemetry, cost, *, buckets: int = 1) -> None:
    """Copy a CommStats difference into the step's telemetry (same field names); extra rounds
    are those beyond one per bucket (the heuristics' exponent rounds)."""
    tel.bytes_sent, tel.bytes_received = cost.bytes_sent, cost.bytes_received
    tel.packets_sent, tel.packets_received = cost.packets_sent, cost.packets_received
    tel.rounds, tel.wraps = cost.rounds, cost.wraps
    tel.extra_rounds = max(cost.rounds - buckets, 0)


class Reducer:
    """Average gradients over the collective's group with one codec (one worker's view).

    Args:
        codec: this worker's codec (built with the collective's rank and world size).
        collective: this worker's collective (every worker passes its own, of one kind).
        names: parameter names, for error messages.
        timeout: seconds to wait for one collective call's result.
    """

    def __init__(self, codec: Codec, collective: Collective, *, names: list[str] | None = None,
                 timeout: float = 300.0) -> None:
        if (codec.n, codec.rank) != (collective.world_size, collective.rank):
            raise ValueError(f"codec built for rank {codec.rank} of {codec.n}, collective is "
                             f"rank {collective.rank} of {collective.world_size}")
        self.codec, self.collective, self.names, self.timeout = codec, collective, names, timeout

    @property
    def name(self) -> str:
        return self.codec.name

    @property
    def collective_kind(self) -> str:
        """"int" (the switch will do) or "torch" (fp32 sums or all-gathers)."""
        return "int" if self.codec.runs_on_switch() else "torch"

    def reduce(self, grads: list[torch.Tensor], *, step: int, lr: float,
               split: Sequence[int] | None = None) -> tuple[list[torch.Tensor], StepTelemetry]:
        """Average the gradients over all workers.

        Args:
            grads: this worker's gradient tensors (any shapes, float dtypes; one device).
            step: the global step number (keys the rounding's random stream; same on all workers).
            lr: the learning rate this step will use (IntSGD's alpha depends on it).
            split: optional bucket sizes in tensors (e.g. [3, 2] for five tensors); default one
                bucket.
        Returns:
            (averaged gradients as new tensors with the inputs' shapes/dtypes/devices, telemetry).
        Raises:
            NonFiniteGradient: a gradient holds NaN or Inf (raised before anything is sent).
            SwitchError subclasses: from the collective.
        """
        check_finite(grads, self.names)
        sizes = [g.numel() for g in grads]
        device = grads[0].device if grads else torch.device("cpu")
        flat = (torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads])
                if grads else torch.zeros(0))
        out = torch.empty_like(flat)
        codec, before = self.codec, self.collective.stats.snapshot()
        codec.begin(step, lr)
        spent = [0.0, 0.0, 0.0]   # quantize, communicate, decode
        streamed = [0.0]          # a Stream's encode, run inside the collective call
        offset, t_index = 0, 0
        for index, count in enumerate(split or [len(grads)]):
            bsizes = sizes[t_index:t_index + count]
            bucket = Bucket.of_sizes(bsizes, index=index, offset=offset,
                                     keys=range(t_index, t_index + count),
                                     shapes=[g.shape for g in grads[t_index:t_index + count]])
            a, b = offset, offset + bucket.numel
            t0 = time.perf_counter()
            payload = timed_stream(codec.encode(flat[a:b], bucket), streamed)
            t1 = time.perf_counter()
            payload, future = self.collective.launch(payload)
            reduced = future.result(timeout=self.timeout)
            t2 = time.perf_counter()
            codec.decode(reduced, payload.ctx, out[a:b])
            spent[0] += t1 - t0
            spent[1] += t2 - t1
            spent[2] += time.perf_counter() - t2
            offset, t_index = b, t_index + count
        if t_index != len(grads):
            raise ValueError(f"split {list(split)} covers {t_index} of {len(grads)} tensors")
        codec.end()
        tel = codec.tel
        tel.numel = flat.numel()
        tel.t_quantize, tel.t_decode = spent[0] + streamed[0], spent[2]
        tel.t_communicate = max(spent[1] - streamed[0], 0.0)
        fill_costs(tel, self.collective.stats.since(before), buckets=len(split or [0]))
        pieces = torch.split(out, sizes) if grads else []
        return [p.view(g.shape).to(device=g.device, dtype=g.dtype).clone()
                for p, g in zip(pieces, grads)], tel

    def state_dict(self) -> dict:
        return self.codec.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.codec.load_state_dict(state)
