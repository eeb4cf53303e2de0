"""What every gradient-reduction method shares: the `Method` interface, flattening, checks, timing.

What it owns: `Method` (name, collective_kind, reduce, state_dict), the flatten/unflatten of a list
of gradient tensors into one float32 vector and back, the non-finite check that runs before
anything is sent, and `IntegerMethod`, the plumbing of the integer methods (budget bounds, the
quantize and sum calls with their timing, the integer telemetry). What it must never do: choose a
scale (each method's own file does) or keep per-step state other than the method's.

How `reduce` runs: check every tensor is finite (NonFiniteGradient names the first bad one) ->
flatten to one float32 numpy vector on the CPU -> the method's `_reduce_flat` (scale, round, sum,
decode) -> split the averaged vector back into new tensors with the inputs' shapes, dtypes and
devices -> fill the wire cost from the collective's counters.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager

import numpy as np
import torch

from switchagg import kernels
from switchagg.collectives import Collective
from switchagg.errors import SwitchError
from switchagg.scaling import clip_bounds, max_magnitude
from switchagg.telemetry import StepTelemetry, int_summary

__all__ = ["Method", "IntegerMethod", "NonFiniteGradient", "Layout", "check_finite",
           "non_finite_counts"]


class NonFiniteGradient(SwitchError, ValueError):
    """A gradient holds NaN or Inf: no integer scale can represent it, so nothing was sent."""


class Layout:
    """Shapes, dtypes and devices of a gradient list, to flatten it and rebuild it."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self.shapes = [g.shape for g in grads]
        self.dtypes = [g.dtype for g in grads]
        self.devices = [g.device for g in grads]
        self.sizes = [g.numel() for g in grads]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self.numel = int(self.offsets[-1])

    def flatten(self, grads: list[torch.Tensor]) -> np.ndarray:
        flat = torch.cat([g.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
                          for g in grads]) if grads else torch.zeros(0)
        return flat.numpy()

    def unflatten(self, flat: np.ndarray) -> list[torch.Tensor]:
        flat_t = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        return [flat_t[a:b].reshape(shape).to(device=dev, dtype=dt).clone()
                for a, b, shape, dev, dt in zip(self.offsets[:-1], self.offsets[1:], self.shapes,
                                                 self.devices, self.dtypes)]


def non_finite_counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a tensor, or None when every value is finite (the usual case,
    one pass)."""
    t = t.detach()
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    nans = int(torch.isnan(t).sum())
    return nans, int(t.numel() - int(finite.sum()) - nans)


def check_finite(grads: list[torch.Tensor], names: list[str] | None = None) -> None:
    """Raise NonFiniteGradient naming the first tensor holding NaN or Inf."""
    for i, g in enumerate(grads):
        counts = non_finite_counts(g)
        if counts is not None:
            name = names[i] if names is not None and i < len(names) else f"grads[{i}]"
            nans, infs = counts
            raise NonFiniteGradient(
                f"gradient {name} (shape {tuple(g.shape)}) holds {nans} NaN and {infs} Inf values; "
                f"nothing was sent. Lower the learning rate, clip gradients or use loss scaling "
                f"before reducing.", field=name)


class Method(ABC):
    """One gradient-reduction method, as one worker runs it.

    Attributes:
        name: registry name.
        collective_kind: what it needs of the collective: "float" (fp32 SUM) or "int" (int32 SUM,
            exponent MAX).
    """

    name: str = "abstract"
    collective_kind: str = "int"

    def __init__(self, collective: Collective, *, seed: int = 0, bits: int = 32,
                 names: list[str] | None = None) -> None:
        self.collective = collective
        self.seed = int(seed)
        self.bits = int(bits)
        self.names = names
        self.n = collective.world_size
        self._tel: StepTelemetry | None = None

    def reduce(self, grads: list[torch.Tensor], *, step: int, lr: float
               ) -> tuple[list[torch.Tensor], StepTelemetry]:
        """Average the gradients over all workers.

        Args:
            grads: this worker's gradient tensors (any shapes, float dtypes, devices).
            step: the global step number (keys the rounding's random stream; same on all workers).
            lr: the learning rate this step will use (IntSGD's alpha depends on it).
        Returns:
            (averaged gradients as new tensors with the inputs' shapes/dtypes/devices, telemetry).
        Raises:
            NonFiniteGradient: a gradient holds NaN or Inf (raised before anything is sent).
            SwitchError subclasses: from the collective.
        """
        check_finite(grads, self.names)
        layout = Layout(grads)
        x = layout.flatten(grads)
        tel = self._tel = StepTelemetry(method=self.name, step=int(step), numel=layout.numel)
        before = self.collective.stats.snapshot()
        out = self._reduce_flat(x, layout, int(step), float(lr), tel)
        cost = self.collective.stats.since(before)
        tel.bytes_sent, tel.bytes_received = cost.bytes_sent, cost.bytes_received
        tel.packets_sent, tel.packets_received = cost.packets_sent, cost.packets_received
        tel.rounds, tel.wraps = cost.rounds, cost.wraps
        tel.extra_rounds = max(cost.rounds - 1, 0)
        self._tel = None
        return layout.unflatten(out), tel

    @abstractmethod
    def _reduce_flat(self, x: np.ndarray, layout: Layout, step: int, lr: float,
                     tel: StepTelemetry) -> np.ndarray:
        """The averaged gradient (float32, len(x)) from this worker's flat float32 gradient x."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")

    @contextmanager
    def _timed(self, attr: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._tel is not None:
                setattr(self._tel, attr, getattr(self._tel, attr) + time.perf_counter() - t0)


class IntegerMethod(Method):
    """Plumbing shared by the integer methods: budget, quantize, integer SUM, telemetry."""

    collective_kind = "int"

    def __init__(self, collective: Collective, *, seed: int = 0, bits: int = 32,
                 names: list[str] | None = None) -> None:
        super().__init__(collective, seed=seed, bits=bits, names=names)
        self.lo, self.hi = clip_bounds(self.bits, self.n)
        self.magnitude = max_magnitude(self.bits)

    def _quantize(self, x: np.ndarray, scale, *, rounding: str, step: int, offset: int = 0,
                  block: int | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        with self._timed("t_quantize"):
            res = kernels.quantize(x, scale, rounding=rounding, seed=self.seed,
                                   rank=self.collective.rank, step=step, offset=offset,
                                   block=block, lo=self.lo, hi=self.hi, out=out)
        return res.values, int(res.clipped)

    def _sum(self, q: np.ndarray) -> np.ndarray:
        with self._timed("t_communicate"):
            return self.collective.allreduce_int(q)

    def _record(self, tel: StepTelemetry, q: np.ndarray, s: np.ndarray, clipped: int) -> None:
        tel.max_abs_q, _, tel.zero_fraction = int_summary(q)
        tel.max_abs_sum, tel.sum_bits, _ = int_summary(s)
        tel.clipped = clipped
        tel.clip_fraction = clipped / q.size if q.size else 0.0
