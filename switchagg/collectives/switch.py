"""The collective through the emulated switch: integer SUM and exponent MAX in the network.

What it owns: mapping `Collective` (and the codecs' payloads, `launch`) onto one `SwitchClient`,
and reading the wire cost from the client's counters. What it must never do: sum floats or gather
(the switch adds int32 and keeps int8 exponent maxima, nothing else: a method that needs more has
collective_kind "torch" and runs on TorchCollective or LocalCollective), block in the client's
engine thread (nor let a kernel load there: `_launch` loads what a payload's size needs first), or
own the client's lifetime unless it built it.

Payloads launch asynchronously, one client call each (a `Sum` is `allreduce_async`); the Future
completes in the client's engine thread, where the drivers decode. Payloads stay int32 at every
lane width (`lane_bits`, the client's job's: 8, 16 or 32): the client checks that they fit the
lanes (a ValueError, never a silent truncation; a codec's budget no wider than the lanes always
fits) and sign-extends the sums back, so only the bytes on the wire change. A payload's int32 values cross
to the host (a view on CPU, a pinned copy from a GPU); the sums come back to the payload's device.

How the look-ahead works on this client: `SwitchClient.allreduce_stream` hands each chunk's fill
the max exponent the switch returned with the chunk s packets earlier (s = the granted slots).
- More than s chunks: one call of s + chunks packets. The first s packets are the exponent-only
  batch (zero payload) carrying the exponents of chunks 0..s-1; the packet of chunk c carries the
  exponent of chunk c + s. So virtual packet v carries the exponent of chunk v, and chunk c (sent as
  packet s + c) is encoded with the max that came back with packet c: SwitchML's pipeline, one
  extra batch of s packets.
- At most s chunks: the exponent-only batch is just those chunks' packets (waited for in the
  launching thread, so the ranks' calls stay in one order), then a plain SUM: the same two rounds
  with no padding packets.
`allreduce_max` of int8 values uses the exponent register the same way (values as exponents, zero
payload), so the heuristic-global exponent MAX also stays in the network.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np

from switchagg.codecs._base import Stream, Sum
from switchagg.collectives._base import Collective, CommStats, EncodeFn, host_encode, like, to_host
from switchagg.errors import SwitchError
from switchagg.kernels import load_for
from switchagg.scaling.lookahead import lookahead_fill, lookahead_numel, lookahead_sums

__all__ = ["SwitchCollective"]


class SwitchCollective(Collective):
    """A `Collective` over a joined `switchagg.SwitchClient`.

    Args:
        client: a SwitchClient that has joined its job (this object does not close it unless
            owns_client is True).
        owns_client: close the client in `close()`.
    """

    kind = "switch"

    def __init__(self, client, *, owns_client: bool = False) -> None:
        super().__init__(client.rank, client.world_size, k=client.k)
        self.client = client
        self.owns_client = owns_client
        self._base = client.stats()

    @property
    def slots(self) -> int:
        return int(self.client.slots)

    @property
    def lane_bits(self) -> int:
        """The lane width of the client's job (8, 16 or 32 bits per value on the wire)."""
        return int(getattr(self.client, "lane_bits", 32))

    @property
    def stats(self) -> CommStats:
        """Calls and rounds counted here; bytes, packets and wraps read from the client's
        counters (so calls still in flight are counted as far as they went)."""
        now, base = self.client.stats(), self._base
        return dataclasses.replace(
            self._stats,
            bytes_sent=now.bytes_sent - base.bytes_sent,
            bytes_received=now.bytes_received - base.bytes_received,
            packets_sent=now.packets_sent - base.packets_sent,
            packets_received=now.packets_received - base.packets_received,
            wraps=now.wraps - base.wraps)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    # -- codec payloads: asynchronous, one client call each ---------------------------------------

    def _launch(self, payload) -> concurrent.futures.Future:
        # A look-ahead's fill and every decode run in the client's engine thread, which must
        # never load (or compile) a kernel: whatever calls of this size use is loaded here.
        load_for(payload.numel if isinstance(payload, Stream) else len(payload.values))
        if isinstance(payload, Sum):
            values = payload.values
            host = to_host(values)
            if host.dtype != np.int32:
                raise TypeError(f"the switch sums int32 only, got a {host.dtype} payload: run "
                                f"float methods (sgd) on TorchCollective or LocalCollective")
            self._stats.calls += 1
            self._stats.rounds += 1
            return _then(self.client.allreduce_async(host), lambda sums: like(sums, values))
        if isinstance(payload, Stream):
            return self._stream_async(payload)
        raise TypeError("the switch cannot all-gather: run gather methods on TorchCollective "
                        "or LocalCollective")

    def _stream_async(self, payload: Stream, count_call: bool = True) -> concurrent.futures.Future:
        """SwitchML's look-ahead (see the module essay): at most s chunks as an exponent batch
        (waited for here) and a SUM; more as one call of s + chunks packets."""
        exponents, chunks, k, s = payload.exponents, len(payload.exponents), self.k, self.slots
        device: list = []
        encode = host_encode(payload.encode, device)
        self._stats.calls += int(count_call)
        self._stats.rounds += 2
        if chunks <= s:
            max_exp = self._exponent_max(exponents)
            values = np.ascontiguousarray(encode(0, chunks, max_exp), dtype=np.int32).reshape(-1)
            return _then(self.client.allreduce_async(values),
                         lambda sums: (like(sums[:payload.numel], device[0] if device else None),
                                       max_exp))
        errors: list[BaseException] = []

        def guarded_encode(c0: int, c1: int, max_exponents: np.ndarray) -> np.ndarray:
            # Runs in the client's engine thread; an exception must not kill it, so it is kept
            # and raised from the Future instead (the payload then is zeros).
            try:
                return encode(c0, c1, max_exponents)
            except BaseException as exc:  # raised from the Future below
                errors.append(exc)
                return np.zeros((c1 - c0) * k, np.int32)

        call = self.client.allreduce_stream_async(lookahead_numel(chunks, s, k),
                                                  lookahead_fill(exponents, s, k, guarded_encode))

        def unpack(result):
            if errors:
                raise errors[0]
            sums, max_exp = result
            return (like(lookahead_sums(sums, s, k, payload.numel).copy(),
                         device[0] if device else None),
                    np.asarray(max_exp, dtype=np.int8)[:chunks].copy())

        return _then(call, unpack)

    # -- the synchronous primitives ---------------------------------------------------------------

    def _sum_int(self, values: np.ndarray) -> np.ndarray:
        return self.client.allreduce(values)

    def _max(self, values: np.ndarray) -> np.ndarray:
        if values.dtype != np.int8:
            raise TypeError(f"the switch keeps the MAX of int8 exponents only, got {values.dtype}; "
                            f"send exponents (e.g. frexp of the value), or use TorchCollective")
        return self._exponent_max(values)

    def _exponent_max(self, exponents: np.ndarray) -> np.ndarray:
        """One exponent-only batch: a packet per entry, zero payload, exponent = the entry."""
        k = self.k

        def fill(first, stop, returned, values_out, exponents_out):
            values_out[:] = 0
            exponents_out[:] = exponents[first:stop]

        _, max_exp = self.client.allreduce_stream(len(exponents) * k, fill)
        return np.asarray(max_exp, dtype=np.int8)[:len(exponents)].copy()

    def _sum_int_stream(self, exponents: np.ndarray, encode: EncodeFn) -> tuple[np.ndarray, np.ndarray]:
        # allreduce_int_stream counted the call; the stream counts its two rounds.
        return self._stream_async(Stream(exponents, encode, len(exponents) * self.k),
                                  count_call=False).result()

    def _sum_float(self, values: np.ndarray) -> np.ndarray:
        raise SwitchError("the switch sums int32 only: run float methods (sgd) on TorchCollective "
                          "or LocalCollective", field="collective", value="switch")

    def _gather(self, values: np.ndarray) -> list[np.ndarray]:
        raise SwitchError("the switch cannot all-gather: run gather methods on TorchCollective "
                          "or LocalCollective", field="collective", value="switch")


def _then(call: concurrent.futures.Future, post) -> concurrent.futures.Future:
    """A Future of post(call's result), completed in the thread that completes `call`."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def forward(done: concurrent.futures.Future) -> None:
        error = done.exception()
        if error is not None:
            fut.set_exception(error)
            return
        try:
            fut.set_result(post(done.result()))
        except BaseException as exc:  # handed to whoever waits on the Future
            fut.set_exception(exc)

    call.add_done_callback(forward)
    return fut
