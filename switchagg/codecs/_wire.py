"""What the gather compressors share: byte payloads packed on the device, per-block random
streams, Elias code lengths, and the gather codec's encode/decode loop.

What it owns: `pack_bits` / `unpack_bits` (codes of any width packed LSB first into uint8, the way
they travel), `Writer` / `Reader` (one flat uint8 payload per bucket: packed codes, float32
scalars as their 4 bytes, int32 headers), `block_generator` (the random stream of one parameter
block on one rank at one step: independent across ranks, identical in every driver because it is
keyed by the block's stable key, never by the bucketing), `elias_omega_bits` (the code lengths the
QSGD paper counts), and `GatherCodec` (encode every block of a bucket into one byte payload, then
decode every rank's payload and average in rank order). What it must never do: copy a float to the
host (payload bytes stay on the gradient's device until the collective moves them).
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from switchagg.codecs._base import Block, Bucket, Codec, Gather

__all__ = ["pack_bits", "unpack_bits", "Writer", "Reader", "block_generator",
           "elias_omega_bits", "GatherCodec", "packed_bytes"]

_WEIGHTS: dict = {}
_LOCK = threading.Lock()


def packed_bytes(count: int, width: int) -> int:
    """Bytes `count` codes of `width` bits take once packed."""
    return -(-count * width // 8)


def _weights(device) -> torch.Tensor:
    key = str(device)
    with _LOCK:
        w = _WEIGHTS.get(key)
        if w is None:
            w = _WEIGHTS[key] = (2 ** torch.arange(8, dtype=torch.int32)).to(device)
    return w


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integer codes (< 2^width) packed LSB first into ceil(n width / 8) uint8."""
    n = codes.numel()
    if width == 8:
        return codes.to(torch.uint8)
    shifts = torch.arange(width, device=codes.device, dtype=torch.int64)
    bits = ((codes.reshape(-1, 1).to(torch.int64) >> shifts) & 1).reshape(-1)
    pad = packed_bytes(n, width) * 8 - bits.numel()
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8).to(torch.int32) * _weights(codes.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first `count` codes of `width` bits (int64) out of `pack_bits`'s bytes."""
    if width == 8:
        return packed[:count].to(torch.int64)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64)
    bits = ((packed.to(torch.int64).reshape(-1, 1) >> shifts) & 1).reshape(-1)[:count * width]
    place = 2 ** torch.arange(width, device=packed.device, dtype=torch.int64)
    return (bits.view(count, width) * place).sum(1)


class Writer:
    """Pieces of one uint8 payload, concatenated on their device."""

    def __init__(self, device) -> None:
        self.device, self.parts = device, []

    def codes(self, codes: torch.Tensor, width: int) -> None:
        self.parts.append(pack_bits(codes, width))

    def floats(self, values: torch.Tensor) -> None:
        self.parts.append(values.detach().to(torch.float32).contiguous().reshape(-1)
                          .view(torch.uint8))

    def ints(self, values) -> None:
        t = torch.as_tensor(np.asarray(values, dtype=np.int32).reshape(-1)).to(self.device)
        self.parts.append(t.view(torch.uint8))

    def payload(self) -> torch.Tensor:
        if not self.parts:
            return torch.zeros(0, dtype=torch.uint8, device=self.device)
        return torch.cat(self.parts)


class Reader:
    """Reads a `Writer` payload back in the order it was written."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.at = data.reshape(-1), 0

    def _take(self, nbytes: int) -> torch.Tensor:
        if self.at + nbytes > self.data.numel():
            raise ValueError(f"payload of {self.data.numel()} bytes ends before byte "
                             f"{self.at + nbytes}: the ranks disagree on the layout")
        piece = self.data[self.at:self.at + nbytes]
        self.at += nbytes
        return piece

    def codes(self, count: int, width: int) -> torch.Tensor:
        return unpack_bits(self._take(packed_bytes(count, width)), width, count)

    def floats(self, count: int) -> torch.Tensor:
        return self._take(4 * count).clone().view(torch.float32)

    def ints(self, count: int) -> list[int]:
        # Small layout headers (row counts, modes): integers, not floats, cross to the host.
        return [int(v) for v in self._take(4 * count).cpu().clone().view(torch.int32)]


def block_generator(seed: int, rank: int, step: int, key: int, device, salt: int = 0
                    ) -> torch.Generator:
    """The random stream of one block on one rank at one step (`salt` separates uses)."""
    state = np.random.SeedSequence([int(seed) & (2 ** 63 - 1), rank + 1, step + 1, key + 1,
                                    salt]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return g


def elias_omega_bits(k: torch.Tensor) -> torch.Tensor:
    """|Elias omega(k)| for integers k >= 1 (int64): 1 for k = 1, 3 for 2..3, 6 for 4..7, ..."""
    k = k.to(torch.int64)
    total = torch.ones_like(k)
    while True:
        live = k > 1
        if not bool(live.any()):
            return total
        length = _bit_length(k)
        total = total + torch.where(live, length, 0)
        k = torch.where(live, length - 1, 1)


def _bit_length(k: torch.Tensor) -> torch.Tensor:
    """Bits of k >= 1 (exact below 2^53: frexp gives k = m 2^e with m in [0.5, 1))."""
    return torch.frexp(k.to(torch.float64)).exponent.to(torch.int64)


@dataclass
class GatherCtx:
    bucket: Bucket


class GatherCodec(Codec):
    """A compressor whose payload cannot be added: every block of the bucket is encoded into one
    byte payload, all ranks' payloads are gathered, and each is decoded and summed in rank order.

    Subclasses write `_encode_block(x, block, w)` and `_decode_block(r, block, src) -> tensor`,
    and record the paper's bit count with `_paper(bits)`.
    """

    needs = ("gather",)
    wire_dtype = "bytes"

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Gather:
        w = Writer(x.device)
        for block in bucket.blocks:
            self._encode_block(x[block.start:block.stop], block, w)
        return Gather(w.payload(), GatherCtx(bucket))

    def decode(self, reduced, ctx: GatherCtx, out: torch.Tensor) -> None:
        total = None
        for src, data in enumerate(reduced):
            r = Reader(data.to(out.device))
            parts = [self._decode_block(r, block, src) for block in ctx.bucket.blocks]
            flat = torch.cat(parts) if parts else out.new_zeros(0)
            total = flat if total is None else total + flat
        torch.div(total, self.n, out=out)
        with self._lock:
            self.tel.scaling = self.name

    def _paper(self, bits) -> None:
        with self._lock:
            self.tel.paper_bits += int(bits)

    @abstractmethod
    def _encode_block(self, x: torch.Tensor, block: Block, w: Writer) -> None:
        raise NotImplementedError

    @abstractmethod
    def _decode_block(self, r: Reader, block: Block, src: int) -> torch.Tensor:
        raise NotImplementedError
