"""The collective interface every codec's payload runs on: switch, torch.distributed, in-process.

What it owns: the handful of operations a method may ask of "the other workers" (exact wrapping int32
SUM, the SwitchML exponent look-ahead, MAX, fp32 SUM, all-gather) and the accounting of what each
call cost (bytes, packets, rounds, wraps). What it must never do: scale, round or decode anything; a
collective moves integers and floats, the codecs in `switchagg.codecs` decide what they mean.

How it works: a concrete collective implements five primitives (`_sum_int`, `_max`, `_sum_float`,
`_gather`, and optionally `_sum_int_stream`) and adds what each call cost to `self.stats` (a
`CommStats`). The public methods check arguments, count the round and delegate. `launch(payload)`
is what the drivers call with a codec's payload (`switchagg.codecs`): it runs the rounds a payload
chains (a `Max` first, waited for) and returns a Future of the last one's result, on the payload's
device; by default synchronously (the in-process group), asynchronously where the transport can
(`SwitchCollective`, `TorchCollective` override `_launch`). Only the switch has
a native exponent look-ahead; everywhere else `allreduce_int_stream` is emulated exactly as two rounds:
one MAX all-reduce of the int8 block exponents, then the integer SUM (so the heuristic's extra
round is counted on every collective, as it costs one on a real switch).

Integer semantics (the contract all three implementations keep, and tests check): the SUM of int32
arrays wraps around modulo 2^32 exactly like the switch's two's-complement adders; a call whose
exact sum leaves the int32 range still returns the wrapped value and counts the packets it wrapped
in `stats.wraps`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from switchagg.codecs._base import Gather, Max, Stream, Sum

from switchagg.packet import DEFAULT_K, HEADER_BYTES, check_k

__all__ = ["Collective", "CommStats", "EncodeFn", "wrap_int32", "packets_for", "wire_bytes",
           "to_host", "like", "completed", "host_encode", "HOST_TRANSFERS"]

#: dtype name -> bytes of payload handed from a codec to a transport's host side by `to_host`
#: (a view for CPU tensors, a pinned copy for CUDA ones). Tests check that switch methods hand
#: over int32 only: the floats stay where the gradient lives.
HOST_TRANSFERS: collections.Counter = collections.Counter()

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1

#: encode(first, stop, max_exponents) -> int32 payload of chunks [first, stop), shape
#: ((stop - first) * k,) or (stop - first, k); max_exponents[j] is the MAX over workers of the
#: block exponent of chunk first + j.
EncodeFn = Callable[[int, int, np.ndarray], np.ndarray]


@dataclass
class CommStats:
    """Cumulative cost of one worker's collective calls. Subtract two snapshots for one step.

    The wire fields carry the names of the client's counters (`switchagg.ClientStats`, from the
    stream machine's `StreamCounters`) and of the step's `StepTelemetry`, unchanged on the way up.

    Attributes:
        calls: collective calls made.
        rounds: communication rounds (a stream all-reduce is two: exponents, then values).
        bytes_sent, bytes_received: bytes this worker put on / took off the wire (headers included
            where the collective is packetized; see each implementation).
        packets_sent, packets_received: packets of `switchagg.packet` (0 for torch.distributed, which does
            not packetize).
        wraps: packets (k-element chunks) whose int32 sum wrapped around.
    """

    calls: int = 0
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    wraps: int = 0

    def snapshot(self) -> "CommStats":
        return dataclasses.replace(self)

    def since(self, before: "CommStats") -> "CommStats":
        """The cost accumulated since `before` (a snapshot of this object)."""
        return CommStats(**{f.name: getattr(self, f.name) - getattr(before, f.name)
                            for f in dataclasses.fields(self)})


def to_host(values) -> np.ndarray:
    """A payload as a 1-D host numpy array: a view of a CPU tensor or array, a copy of a CUDA one
    (through pinned memory); counted in HOST_TRANSFERS."""
    if isinstance(values, torch.Tensor):
        t = values.detach().reshape(-1)
        HOST_TRANSFERS[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
        if t.device.type == "cpu":
            return t.contiguous().numpy()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        return host.numpy()
    out = np.ascontiguousarray(values).reshape(-1)
    HOST_TRANSFERS[out.dtype.name] += out.nbytes
    return out


def like(result: np.ndarray, ref) -> Any:
    """A host result as a tensor next to `ref` (a tensor, or a device); numpy if ref is neither."""
    device = ref.device if isinstance(ref, torch.Tensor) else ref
    if device is None and not isinstance(ref, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result))
    t = torch.from_numpy(np.ascontiguousarray(result))
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=False)


def host_encode(encode: Callable, device: list) -> Callable[[int, int, np.ndarray], np.ndarray]:
    """A Stream's encode whose tensors come back as host int32 (the device seen is noted)."""
    def run(c0: int, c1: int, max_exponents: np.ndarray) -> np.ndarray:
        out = encode(c0, c1, max_exponents)
        if isinstance(out, torch.Tensor) and not device:
            device.append(out.device)
        return to_host(out)
    return run


def completed(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """A Future already holding fn()'s result or its exception."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    try:
        fut.set_result(fn())
    except BaseException as exc:  # handed to whoever waits on the Future
        fut.set_exception(exc)
    return fut


def wrap_int32(exact: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of exact integer sums (int64) into int32, as the switch's adders do."""
    # int64 -> uint32 keeps the low 32 bits (modular, well defined); the view reinterprets them.
    return np.asarray(exact, dtype=np.int64).astype(np.uint32).view(np.int32)


def packets_for(numel: int, k: int) -> int:
    """Packets of k values needed for numel values (the last one zero-padded)."""
    return -(-numel // k)


def wire_bytes(packets: int, k: int) -> int:
    """Bytes on the wire for that many packets of `switchagg.packet` (16-byte header + k int32)."""
    return packets * (HEADER_BYTES + 4 * k)


def chunks_wrapped(partial_sums: np.ndarray, k: int) -> int:
    """How many k-element chunks saw an int32 overflow in any partial sum (rows: prefixes)."""
    bad = (partial_sums < _INT32_MIN) | (partial_sums > _INT32_MAX)
    bad = bad.reshape(-1, bad.shape[-1]).any(axis=0)
    numel = bad.size
    pad = packets_for(numel, k) * k - numel
    return int(np.pad(bad, (0, pad)).reshape(-1, k).any(axis=1).sum()) if numel else 0


class Collective(ABC):
    """One worker's view of the group. Every method here is collective: all ranks call it, in order.

    Attributes:
        rank, world_size: this worker and the group size.
        kind: "local", "torch" or "switch".
        k: values per packet, used for packet accounting and the exponent look-ahead.
        stats: cumulative `CommStats`.
    """

    kind: str = "abstract"

    def __init__(self, rank: int, world_size: int, *, k: int = DEFAULT_K) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.rank = rank
        self.world_size = world_size
        self.k = check_k(k)
        self._stats = CommStats()

    @property
    def stats(self) -> CommStats:
        """Cumulative `CommStats` of this worker's calls."""
        return self._stats

    # -- codec payloads (what the drivers call) ---------------------------------------------------

    def launch(self, payload) -> tuple[Any, concurrent.futures.Future]:
        """Start the collective operation a codec payload needs (`switchagg.codecs`).

        A `Max` round (or any payload with `then`) is run to completion first, in the calling
        thread (bounded by the transport's timeout), and its `then` gives the next payload; the
        last one is launched asynchronously where the transport allows it, so every rank issues
        its calls in the order its driver launches buckets.

        Args:
            payload: a `Sum`, `Stream`, `Max` or `Gather` from a codec's encode.
        Returns:
            (the payload that was launched, a Future of its reduced value): a tensor of the
            payload's dtype on its device (Sum), (int32 sums of `numel`, int8 max exponents)
            (Stream), or the list of every rank's tensor (Gather).
        Raises:
            TypeError: a payload this collective cannot carry (the message says which can).
        """
        while True:
            if isinstance(payload, Max):
                payload = payload.then(self.allreduce_max(np.asarray(payload.values)))
            elif not isinstance(payload, (Sum, Stream, Gather)):
                raise TypeError(f"a codec returned {type(payload).__name__}; expected Sum, "
                                f"Stream, Max or Gather")
            elif getattr(payload, "then", None) is not None:   # an intermediate round
                payload = payload.then(self._launch(payload).result())
            else:
                return payload, self._launch(payload)

    def _launch(self, payload) -> concurrent.futures.Future:
        """Default: run the payload synchronously (the in-process group) and hand back a done Future."""
        return completed(lambda: self._run(payload))

    def _run(self, payload):
        if isinstance(payload, Sum):
            values = payload.values
            host = to_host(values)
            if host.dtype == np.int32:
                return like(self.allreduce_int(host), values)
            if host.dtype == np.float32:
                return like(self.allreduce_float(host), values)
            raise TypeError(f"Sum payloads are int32 or float32, got {host.dtype}")
        if isinstance(payload, Stream):
            device = []
            sums, max_exp = self.allreduce_int_stream(payload.exponents,
                                                      host_encode(payload.encode, device))
            return like(sums[:payload.numel], device[0] if device else None), max_exp
        parts = self.allgather(to_host(payload.values))
        return [like(p, payload.values) for p in parts]

    # -- public API ---------------------------------------------------------------------------

    def allreduce_int(self, values: np.ndarray) -> np.ndarray:
        """Exact, wrapping int32 SUM over all workers.

        Args:
            values: 1-D int32 array, the same length on every worker (not modified).
        Returns:
            a new 1-D int32 array, the two's-complement wrapped sum.
        Raises:
            TypeError: values are not int32. SwitchTimeout / JobAborted: from the transport.
        """
        values = _as_1d(values, np.int32, "allreduce_int")
        self._stats.calls += 1
        self._stats.rounds += 1
        return self._sum_int(values)

    def allreduce_int_stream(self, exponents: np.ndarray, encode: EncodeFn) -> tuple[np.ndarray, np.ndarray]:
        """Integer SUM of a payload whose chunk c is encoded knowing the MAX exponent of chunk c.

        This is SwitchML's look-ahead: the block exponents travel ahead of the values, the switch
        keeps their max per slot, and each chunk is scaled with the max before it is sent.

        Args:
            exponents: 1-D int8, this worker's block exponent of each chunk of k values.
            encode: see `EncodeFn`; called once or more with consecutive chunk ranges.
        Returns:
            (sums, max_exponents): int32 (chunks * k,) wrapped sum, int8 (chunks,) max exponents.
        """
        exponents = _as_1d(exponents, np.int8, "allreduce_int_stream")
        self._stats.calls += 1
        return self._sum_int_stream(exponents, encode)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        """Elementwise MAX over all workers (any numeric dtype, kept)."""
        values = np.ascontiguousarray(values).reshape(-1)
        self._stats.calls += 1
        self._stats.rounds += 1
        return self._max(values)

    def allreduce_float(self, values: np.ndarray) -> np.ndarray:
        """fp32 SUM over all workers (the full-precision SGD baseline). Order of additions: the
        transport's; results may differ in the last bit between collectives."""
        values = _as_1d(values, np.float32, "allreduce_float")
        self._stats.calls += 1
        self._stats.rounds += 1
        return self._sum_float(values)

    def allgather(self, values: np.ndarray) -> list[np.ndarray]:
        """Every worker's 1-D array (lengths may differ; dtype must match), indexed by rank."""
        values = np.ascontiguousarray(values).reshape(-1)
        self._stats.calls += 1
        self._stats.rounds += 1
        return self._gather(values)

    def close(self) -> None:
        """Release transport resources (default: none)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what an implementation provides --------------------------------------------------------

    @abstractmethod
    def _sum_int(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @abstractmethod
    def _max(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @abstractmethod
    def _sum_float(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @abstractmethod
    def _gather(self, values: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def _sum_int_stream(self, exponents: np.ndarray, encode: EncodeFn) -> tuple[np.ndarray, np.ndarray]:
        """Emulation for collectives without an exponent register: MAX round, then SUM round."""
        self._stats.rounds += 2
        max_exp = self._exponent_max(exponents)
        payload = np.ascontiguousarray(encode(0, len(exponents), max_exp), dtype=np.int32).reshape(-1)
        if payload.size != len(exponents) * self.k:
            raise ValueError(f"encode returned {payload.size} values for {len(exponents)} chunks "
                             f"of k={self.k}; it must return chunks * k")
        return self._sum_int(payload), max_exp

    def _exponent_max(self, exponents: np.ndarray) -> np.ndarray:
        """The exponent round of the emulated look-ahead (default: a MAX all-reduce of int8)."""
        return self._max(exponents)


def _as_1d(values: np.ndarray, dtype, op: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != dtype:
        raise TypeError(f"{op} takes {np.dtype(dtype).name} arrays, got {values.dtype}; "
                        f"convert explicitly (the collective never casts silently)")
    return np.ascontiguousarray(values).reshape(-1)
