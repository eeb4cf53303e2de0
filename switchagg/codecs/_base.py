"""The codec interface: one method's math, as one worker runs it, on the gradient's own device.

Start here to add a method. A codec is the only place a method's math lives (GRACE's compressor,
with its memory): it turns one bucket of gradient (a flat float tensor on CPU or CUDA) into what the
method puts on the wire, and the reduced payload back into the bucket's average. It never talks to
the network: it returns a *payload* that names the collective operation it needs, and a driver runs
that operation. Two drivers exist and nothing else calls codecs: the DDP communication hook
(`switchagg.ddp`, which `switchagg compare` and `switchagg worker` train through) and the in-process
simulator (`switchagg.reducer.Reducer`, for tests and quick experiments).

What it must never do: open a socket or wait on one, read a clock, copy floats to the host (only
integer payloads may cross; the kernels in `switchagg.kernels` dispatch to numba or cupy by where
the tensor lives), or let ranks disagree on a scale (every worker runs the same codec with the same
arguments, and derives scales only from what every worker holds).

Theory of operation. Per iteration, in the same order on every worker:

    codec.begin(step, lr)                        # folds the previous iteration's observations
    for each bucket, in the same order on every rank:
        payload = codec.encode(flat, bucket)     # Sum | Stream | Max | Gather (below)
        reduced = <driver runs payload's op>     # switch, torch.distributed or in-process
        codec.decode(reduced, payload.ctx, out)  # any thread, buckets in any order
    codec.end()                                  # every bucket decoded: update r, shifts, ...

Payloads say what they need of the network (`Codec.needs` lists the kinds a codec may return):
- `Sum`: the element-wise SUM of an int32 tensor (the switch, an integer all-reduce) or of a
  float32 tensor (torch.distributed only: the fp32 baseline). int32 sums wrap like the switch.
- `Stream`: SwitchML's exponent look-ahead: int8 block exponents travel ahead, the MAX of each
  chunk's exponent comes back, and `encode(c0, c1, max_exponents)` scales chunks [c0, c1) with
  it; the reduced value is (int32 sums, int8 max exponents). Native on the switch (one call),
  emulated elsewhere as a MAX round then a SUM round.
- `Max`: a small MAX all-reduce whose result the codec needs before it can encode (the IntSGD
  authors' heuristic asks for max ||g||_inf first); `then(result)` returns the next payload. The
  driver waits for it in the hook thread (bounded), so every rank issues its calls in one order.
- `Gather`: an all-gather of a payload that cannot be added (QSGD's levels, packed signs); the
  reduced value is the list of every rank's tensor, indexed by rank.
A `Sum` or `Gather` with `then` is an intermediate round of a multi-round method (PowerSGD's P
before its Q): the driver waits for it like a `Max` and continues with `then(result)`.

Buckets. `Bucket` says where the flat tensor sits in the iteration: `offset` (its first element's
index among all elements of this iteration, which keys the rounding's random stream so that
buckets never share random numbers), and its `blocks`: (key, start, stop) per parameter, `key` a
number that names the parameter across iterations (DDP rebuilds its buckets after the first
iteration, so per-parameter state, such as IntDIANA's shifts or an error-feedback residual, is
kept by key, never by bucket index).

Threads. DDP's hook thread calls begin/encode; decode runs wherever the reduction completes (the
switch client's engine thread, gloo's thread). Codecs that accumulate across buckets take
`self._lock`; per-parameter state touched by decode is never read by another bucket's encode.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from switchagg.errors import NonFiniteGradient
from switchagg.scaling import clip_bounds, max_magnitude
from switchagg.telemetry import StepTelemetry, bits_needed, int_summary

__all__ = ["Codec", "IntegerCodec", "Bucket", "Block", "Sum", "Stream", "Max", "Gather",
           "Payload", "NEEDS", "non_finite_counts", "check_finite", "host_int8", "int_stats"]

#: What a payload may need of the network (see the module essay).
NEEDS = ("sum", "max", "stream", "gather")


@dataclass(frozen=True)
class Block:
    """One parameter's span inside a bucket: flat[start:stop], named by a stable key; `shape` is
    the parameter's shape where the driver knows it (PowerSGD views matrices by it)."""

    key: int
    start: int
    stop: int
    shape: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Bucket:
    """Where a flat gradient tensor sits in its iteration (see the module essay).

    Attributes:
        index: position of the bucket in this iteration's launch order (0, 1, ...).
        offset: index of flat[0] among all elements of this iteration (the random stream's offset).
        numel: elements in the bucket.
        blocks: one Block per parameter, covering [0, numel) in order.
    """

    index: int
    offset: int
    numel: int
    blocks: tuple[Block, ...]

    @staticmethod
    def whole(numel: int, *, index: int = 0, offset: int = 0, key: int = 0) -> "Bucket":
        """A bucket that is one block."""
        return Bucket(index, offset, numel, (Block(key, 0, numel),))

    @staticmethod
    def of_sizes(sizes, *, index: int = 0, offset: int = 0, keys=None, shapes=None) -> "Bucket":
        """A bucket of consecutive blocks of the given sizes (keys 0.. unless given)."""
        keys = list(range(len(sizes))) if keys is None else list(keys)
        shapes = [None] * len(sizes) if shapes is None else [tuple(s) for s in shapes]
        blocks, a = [], 0
        for key, size, shape in zip(keys, sizes, shapes):
            blocks.append(Block(int(key), a, a + int(size), shape))
            a += int(size)
        return Bucket(index, offset, a, tuple(blocks))


@dataclass(frozen=True)
class Sum:
    """SUM over workers of `values` (int32: wrapping; float32: torch.distributed only).

    With `then`, this is an intermediate round (PowerSGD's P before its Q): the driver waits for
    the sum and `then(sum)` gives the next payload."""

    values: Any
    ctx: Any = None
    then: Callable[[Any], "Payload"] | None = None
    need: ClassVar[str] = "sum"


@dataclass(frozen=True)
class Stream:
    """SwitchML's look-ahead: `exponents` (host int8, one per chunk of k) ride ahead; chunk c's
    payload is `encode(c0, c1, max_exponents)` (int32, (c1 - c0) * k values, x's device)."""

    exponents: np.ndarray
    encode: Callable[[int, int, np.ndarray], Any]
    numel: int
    ctx: Any = None
    need: ClassVar[str] = "stream"


@dataclass(frozen=True)
class Max:
    """A MAX all-reduce of `values` (host array) whose result `then` turns into the next payload."""

    values: np.ndarray
    then: Callable[[np.ndarray], "Payload"]
    need: ClassVar[str] = "max"


@dataclass(frozen=True)
class Gather:
    """All-gather of `values` (a 1-D tensor, any dtype; lengths may differ by rank); with `then`,
    an intermediate round as for `Sum`."""

    values: Any
    ctx: Any = None
    then: Callable[[Any], "Payload"] | None = None
    need: ClassVar[str] = "gather"


Payload = Sum | Stream | Max | Gather


def host_int8(values) -> np.ndarray:
    """Small int8 metadata (block exponents) as a host numpy array (exponents are not floats)."""
    if isinstance(values, torch.Tensor):
        if values.dtype != torch.int8:
            raise TypeError(f"exponents must be int8, got {values.dtype}")
        return values.detach().to("cpu").numpy()
    if type(values).__module__.startswith("cupy"):
        return values.get().astype(np.int8, copy=False)
    return np.asarray(values, dtype=np.int8)


def non_finite_counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a tensor, or None when every value is finite (one pass)."""
    t = t.detach()
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    nans = int(torch.isnan(t).sum())
    return nans, int(t.numel() - int(finite.sum()) - nans)


def check_finite(grads, names=None, *, where: str = "gradient") -> None:
    """Raise NonFiniteGradient naming the first tensor holding NaN or Inf (nothing was sent)."""
    for i, g in enumerate(grads):
        counts = non_finite_counts(g)
        if counts is not None:
            name = names[i] if names is not None and i < len(names) else f"grads[{i}]"
            nans, infs = counts
            raise NonFiniteGradient(
                f"{where} {name} (shape {tuple(g.shape)}) holds {nans} NaN and {infs} Inf values; "
                f"nothing was sent. Lower the learning rate, clip gradients or use loss scaling "
                f"before reducing.", field=name)


class Codec(ABC):
    """One method's math for one worker (see the module essay).

    Class attributes:
        name: registry name (set by the registry).
        needs: the payload kinds `encode` may return (a subset of NEEDS).
        wire_dtype: "int32" (the switch can carry it), "float32" or "bytes" (torch.distributed).
        unbiased: whether E[decoded] equals the true average (for the tests and the docs).

    Args:
        world_size, rank: the group and this worker.
        seed: seed of the randomized rounding stream (same on every worker).
        bits: integer budget of each sum (8, 16 or 32; integer codecs only).
        k: values per packet (chunking of per-packet exponents).
    """

    name: str = "abstract"
    needs: ClassVar[tuple[str, ...]] = ("sum",)
    wire_dtype: ClassVar[str] = "int32"
    unbiased: ClassVar[bool] = False

    def __init__(self, *, world_size: int, rank: int, seed: int = 0, bits: int = 32,
                 k: int = 64) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.n, self.rank, self.seed, self.bits, self.k = world_size, rank, int(seed), int(bits), k
        self.step = -1
        self.lr = 0.0
        self.tel = StepTelemetry(method=self.name, step=-1)
        self._lock = threading.Lock()
        self._open = False

    @classmethod
    def runs_on_switch(cls) -> bool:
        """Whether every payload of this codec is something the switch can reduce."""
        return cls.wire_dtype == "int32" and set(cls.needs) <= {"sum", "stream", "max"}

    # -- the iteration --------------------------------------------------------------------------

    def begin(self, step: int, lr: float) -> None:
        """Start iteration `step` with learning rate `lr` (folding the previous one first)."""
        self.end()
        self.step, self.lr = int(step), float(lr)
        self.tel = StepTelemetry(method=self.name, step=int(step))
        self._open = True
        self._begin()

    def end(self) -> None:
        """Close the current iteration (every bucket decoded): update the method's state."""
        if self._open:
            self._open = False
            self._end()

    @abstractmethod
    def encode(self, x: torch.Tensor, bucket: Bucket) -> Payload:
        """This worker's payload for one bucket. x: 1-D float tensor (CPU or CUDA), not modified."""
        raise NotImplementedError

    @abstractmethod
    def decode(self, reduced: Any, ctx: Any, out: torch.Tensor) -> None:
        """Write the bucket's average into out (1-D float tensor, x's device and length)."""
        raise NotImplementedError

    def _begin(self) -> None:
        """Per-iteration set-up (e.g. take alpha); default none."""

    def _end(self) -> None:
        """Per-iteration fold (e.g. update r); default none."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")

    # -- telemetry ------------------------------------------------------------------------------

    def _record_ints(self, q, sums, clipped: int) -> None:
        """Fold one bucket's integers into this iteration's telemetry (any thread)."""
        max_q, _, zeros = int_stats(q)
        max_s, bits, _ = int_stats(sums)
        numel = int(q.shape[0])
        with self._lock:
            t = self.tel
            before = t.numel_int
            t.max_abs_q = max(t.max_abs_q, max_q)
            t.max_abs_sum = max(t.max_abs_sum, max_s)
            t.sum_bits = max(t.sum_bits, bits)
            t.clipped += int(clipped)
            t.numel_int = before + numel
            if t.numel_int:
                t.zero_fraction = (t.zero_fraction * before + zeros * numel) / t.numel_int
                t.clip_fraction = t.clipped / t.numel_int

    def _record_scales(self, lo: float, hi: float, scalar: float | None, scaling: str) -> None:
        with self._lock:
            t = self.tel
            t.scaling = scaling
            t.alpha_min = lo if t.alpha_min is None else min(t.alpha_min, lo)
            t.alpha_max = hi if t.alpha_max is None else max(t.alpha_max, hi)
            t.alpha = scalar


class IntegerCodec(Codec):
    """What the integer codecs share: the budget's clip bounds and SwitchML's magnitude M."""

    needs = ("sum",)
    wire_dtype = "int32"

    def __init__(self, **common) -> None:
        super().__init__(**common)
        self.lo, self.hi = clip_bounds(self.bits, self.n)
        self.magnitude = max_magnitude(self.bits)


def int_stats(a) -> tuple[int, int, float]:
    """(max |v|, bits needed, fraction of zeros) of an int32 array or tensor, on its own device
    (only three scalars cross to the host)."""
    if isinstance(a, torch.Tensor):
        if a.numel() == 0:
            return 0, 1, 0.0
        lo, hi = int(a.min()), int(a.max())
        zeros = int((a == 0).sum()) / a.numel()
        return max(abs(lo), abs(hi)), bits_needed(lo, hi), zeros
    return int_summary(np.asarray(a))
