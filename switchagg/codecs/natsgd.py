"""natsgd: natural compression C_nat (Horvath, Ho, Horvath, Sahu, Canini, Richtarik, 2019).

Every coordinate t != 0 is rounded at random to one of the two powers of two around it:
2^a with probability (2^(a+1) - |t|) / 2^a, else 2^(a+1) (a = floor(log2 |t|)), keeping its sign:
unbiased, E(C(t) - t)^2 = (2^(a+1) - |t|)(|t| - 2^a) <= t^2 / 8 (omega = 1/8). Done on the float's
bits: round the exponent up iff a uniform 23-bit integer is below the mantissa (P = m / 2^23,
exactly unbiased), then drop the mantissa.

Wire (all-gather: a sum of powers of two is not one): one byte per coordinate, as GRACE and the
IntSGD authors send it: 128 sign + (biased exponent - 18), exponent clipped to [19, 145], code 0
for zero. Magnitudes below 2^-108 become 0 and results above 2^18 saturate (biased there; far
outside a gradient's range). `paper_bits` counts the paper's 9 bits (sign + 8-bit exponent).
"""

from __future__ import annotations

import torch

from switchagg.codecs._base import Block
from switchagg.codecs._wire import GatherCodec, Reader, Writer, block_generator

__all__ = ["NatSGD", "natural_codes", "natural_values"]

_LOW, _HIGH = 19, 145   # biased exponents kept: code (exp - 18) in 1..127, 0 is zero


def natural_codes(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """C_nat of a float32 tensor as uint8 codes (sign << 7 | (biased exponent - 18))."""
    bits = x.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    r = torch.randint(0, 1 << 23, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    exponent = exponent + (r < mantissa).to(torch.int32)
    zero = (exponent < _LOW) | (x == 0)
    code = (exponent.clamp(max=_HIGH) - 18).clamp(min=0)
    code = torch.where(zero, torch.zeros_like(code), code)
    code = code | torch.where((x < 0) & ~zero, 128, 0).to(torch.int32)
    return code.to(torch.uint8)


def natural_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of `natural_codes`."""
    c = codes.to(torch.int32)
    low = c & 127
    bits = ((low + 18) << 23) | ((c >> 7) << 31)
    value = bits.view(torch.float32)
    return torch.where(low == 0, torch.zeros_like(value), value)


class NatSGD(GatherCodec):
    """Natural compression, one byte per coordinate, all-gathered (no options)."""

    unbiased = True

    def _encode_block(self, x: torch.Tensor, block: Block, w: Writer) -> None:
        gen = block_generator(self.seed, self.rank, self.step, block.key, x.device)
        w.codes(natural_codes(x.to(torch.float32), gen), 8)
        self._paper(9 * x.numel())

    def _decode_block(self, r: Reader, block: Block, src: int) -> torch.Tensor:
        return natural_values(r.codes(block.numel, 8))
