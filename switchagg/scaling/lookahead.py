"""SwitchML's exponent look-ahead, laid out on one stream call of the switch client.

What it owns: which packet of the stream carries which exponent and which payload, so that every
chunk is scaled by the max exponent over all workers without waiting a round trip for it. What it
must never do: choose scales or round (the caller's `encode` does), or talk to the switch.

How it works (SwitchML's pipeline of exponent and values): a reduction of `chunks` chunks of k values becomes one stream of
slots + chunks packets. Packet v carries, in its exponent field, the local exponent of chunk v;
the switch returns the max over workers with packet v's result. Packets 0..slots-1 carry no payload
(SwitchML's extra exponent-only batch). Packet slots + c carries chunk c's payload, encoded with the
max exponent returned by packet c: the client fills packet v only after the result of packet
v - slots came back (self-clocking), so that exponent is always known in time. Packets past the last
chunk's exponent carry NO_EXPONENT (-128, which loses every max).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["NO_EXPONENT", "lookahead_numel", "lookahead_fill", "lookahead_sums"]

#: The exponent of "no data": int8's minimum, so it never wins the switch's max.
NO_EXPONENT = -128

#: encode(c0, c1, max_exponents) -> int32 payload of chunks [c0, c1) (shape (c1 - c0) * k),
#: scaled by max_exponents[j], the max over workers of chunk c0 + j's exponent.
EncodeFn = Callable[[int, int, np.ndarray], np.ndarray]


def lookahead_numel(chunks: int, slots: int, k: int) -> int:
    """Length of the stream that carries `chunks` chunks behind their exponent-only batch."""
    return (slots + chunks) * k


def lookahead_fill(exponents: np.ndarray, slots: int, k: int, encode: EncodeFn):
    """The client `fill` of a look-ahead stream (see `switchagg.client`'s allreduce_stream).

    Args:
        exponents: int8 local exponent of each chunk (`kernels.block_exponents`).
        slots: the switch job's slot count (the look-ahead distance).
        k: values per packet.
        encode: turns chunks [c0, c1) into int32 payload, given their max exponents.
    """
    chunks = len(exponents)

    def fill(first: int, stop: int, returned: np.ndarray, values_out: np.ndarray,
             exponents_out: np.ndarray) -> None:
        v = np.arange(first, stop)
        exponents_out[:] = np.where(v < chunks, exponents[np.minimum(v, chunks - 1)], NO_EXPONENT)
        j0 = max(slots - first, 0)  # packets before `slots` are the exponent-only batch
        values_out[:j0] = 0
        if j0 < stop - first:
            payload = encode(first + j0 - slots, stop - slots, returned[j0:])
            values_out[j0:] = np.asarray(payload, dtype=np.int32).reshape(-1, k)

    return fill


def lookahead_sums(sums: np.ndarray, slots: int, k: int, numel: int | None = None) -> np.ndarray:
    """The payload part of a look-ahead stream's sums (a view: skips the exponent-only batch)."""
    start = slots * k
    return sums[start:] if numel is None else sums[start:start + numel]
