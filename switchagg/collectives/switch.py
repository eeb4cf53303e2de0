"""The collective through the emulated switch: integer SUM and exponent MAX in the network.

What it owns: mapping `Collective` onto one `SwitchClient` (DESIGN.md §8) and reading the wire cost
from the client's counters. What it must never do: sum floats or gather (the switch adds int32 and
keeps int8 exponent maxima, nothing else: a method that needs more says collective_kind "float" and
runs on TorchCollective or LocalCollective), or own the client's lifetime unless it built it.

How the look-ahead works on this client: `SwitchClient.allreduce_stream` hands each chunk's fill
the max exponent the switch returned with the chunk s packets earlier (s = the granted slots).
- More than s chunks: one call of s + chunks packets. The first s packets are the exponent-only
  batch (zero payload) carrying the exponents of chunks 0..s-1; the packet of chunk c carries the
  exponent of chunk c + s. So virtual packet v carries the exponent of chunk v, and chunk c (sent as
  packet s + c) is encoded with the max that came back with packet c: SwitchML's pipeline, one
  extra batch of s packets.
- At most s chunks: the exponent-only batch is just those chunks' packets, then a plain SUM: the
  same two rounds with no padding packets.
`allreduce_max` of int8 values uses the exponent register the same way (values as exponents, zero
payload), so the heuristic-global exponent MAX also stays in the network.
"""

from __future__ import annotations

import numpy as np

from switchagg.collectives._base import Collective, EncodeFn
from switchagg.errors import SwitchError
from switchagg.scaling.lookahead import lookahead_fill, lookahead_numel, lookahead_sums

__all__ = ["SwitchCollective"]


def _warm_up_kernels(k: int) -> None:
    """Compile the per-packet quantize kernel now, not inside the engine thread.

    A stream's encode runs in the client's engine thread; a first-call JIT compilation there (numba:
    seconds on a busy host) would silence the worker's heartbeats long enough for the switch to
    declare it dead.
    """
    from switchagg import kernels
    kernels.warm_up()  # every CPU kernel: numba compiles each one on its own first call


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
        _warm_up_kernels(self.k)

    @property
    def slots(self) -> int:
        return int(self.client.slots)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def _account(self, before) -> None:
        after = self.client.stats()
        self.stats.bytes_sent += after.bytes_sent - before.bytes_sent
        self.stats.bytes_received += after.bytes_received - before.bytes_received
        self.stats.packets_sent += after.packets_sent - before.packets_sent
        self.stats.packets_received += after.packets_received - before.packets_received
        self.stats.wraps += after.wrapped - before.wrapped

    def _sum_int(self, values: np.ndarray) -> np.ndarray:
        before = self.client.stats()
        try:
            return self.client.allreduce(values)
        finally:
            self._account(before)

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

        before = self.client.stats()
        try:
            _, max_exp = self.client.allreduce_stream(len(exponents) * k, fill)
        finally:
            self._account(before)
        return np.asarray(max_exp, dtype=np.int8)[:len(exponents)].copy()

    def _sum_int_stream(self, exponents: np.ndarray, encode: EncodeFn) -> tuple[np.ndarray, np.ndarray]:
        chunks, k, s = len(exponents), self.k, self.slots
        self.stats.rounds += 2
        if chunks <= s:
            max_exp = self._exponent_max(exponents)
            payload = np.ascontiguousarray(encode(0, chunks, max_exp), dtype=np.int32).reshape(-1)
            return self._sum_int(payload), max_exp

        errors: list[BaseException] = []

        def guarded_encode(c0: int, c1: int, max_exponents: np.ndarray) -> np.ndarray:
            # Runs in the client's engine thread; an exception must not kill it, so it is kept
            # and re-raised here after the call (the payload then is zeros).
            try:
                return encode(c0, c1, max_exponents)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)
                return np.zeros((c1 - c0) * k, np.int32)

        fill = lookahead_fill(exponents, s, k, guarded_encode)
        before = self.client.stats()
        try:
            sums, max_exp = self.client.allreduce_stream(lookahead_numel(chunks, s, k), fill)
        finally:
            self._account(before)
        if errors:
            raise errors[0]
        return lookahead_sums(sums, s, k).copy(), np.asarray(max_exp, dtype=np.int8)[:chunks].copy()

    def _sum_float(self, values: np.ndarray) -> np.ndarray:
        raise SwitchError("the switch sums int32 only: run float methods (sgd) on TorchCollective "
                          "or LocalCollective", field="collective", value="switch")

    def _gather(self, values: np.ndarray) -> list[np.ndarray]:
        raise SwitchError("the switch cannot all-gather: run gather methods on TorchCollective "
                          "or LocalCollective", field="collective", value="switch")
