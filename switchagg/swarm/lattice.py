"""The cubic lattice (mod-q) quantizer: a model sent as b bits per coordinate, decoded against the
receiver's own model.

What it owns: the math of SwarmSGD's model quantizer (Davies et al., ICLR 2021, the simple cubic
lattice; as used by SwarmSGD, Nadiradze et al., NeurIPS 2021): encoding a vector to lattice codes,
decoding them with a reference vector, the check that says whether a decode is right, and the
lattice side a sender should pick. What it must never do: any I/O, any clock, any global random
state (the caller passes a seeded `numpy.random.Generator`).

How it works, with side s and modulus q = 2^bits:
- The sender rounds x/s to a lattice point z (stochastic rounding: floor(x/s + u), u ~ U[0,1), so
  E[s z] = x and the per-coordinate variance is s^2 frac(x/s)(1 - frac(x/s)) <= s^2/4; or
  nearest rounding), and sends c = z mod q, packed at `bits` per coordinate. No norm travels,
  only s: the cost is d*bits bits plus a fixed header.
- The receiver, holding a reference y near x, picks the point of z's residue class nearest to
  y/s: z' = c + q*round((y/s - c)/q). z' = z exactly when |z - y/s|_inf < q/2, which holds
  whenever ||x - y||_inf < s(q - 1)/2 for nearest rounding, and < s(q - 2)/2 for stochastic
  rounding (`decode_radius`). Farther away, z' is off by a multiple of q in some coordinate, and
  the decoded model is wrong by a multiple of q*s there.
- The decode check: the sender also sends an 8-byte digest of z (BLAKE2b over its int64 bytes);
  the receiver recomputes it over z'. A mismatch means the reference was too far away: the caller
  falls back to a full-precision copy. The digest cannot say by how much, only that it is wrong.
- The side: `side_for(distance)` picks s so that a reference within `margin` times `distance`
  still decodes. Smaller s means less quantization noise, larger s a wider decode radius.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BITS",
    "LatticeCode",
    "decode",
    "decode_radius",
    "digest",
    "encode",
    "lattice_point",
    "pack",
    "packed_size",
    "side_for",
    "unpack",
]

#: Bit widths a code can have: nibbles, bytes or 16-bit words pack without waste.
BITS = (4, 8, 16)

#: Lattice points must stay exactly representable in float64 while decoding (|z| < 2^52), so the
#: encoder widens a side that would put |x|/s beyond this.
_MAX_POINT = float(2 ** 50)


@dataclass(frozen=True)
class LatticeCode:
    """One encoded vector: what crosses the network.

    Attributes:
        bits: bits per coordinate (q = 2^bits).
        side: the lattice side s actually used (the encoder may widen the one asked for).
        numel: number of coordinates.
        codes: the packed residues z mod q (`packed_size(numel, bits)` bytes).
        check: 8-byte digest of the lattice point z (the receiver's decode check).
    """

    bits: int
    side: float
    numel: int
    codes: bytes
    check: bytes


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"lattice bits must be one of {BITS}, got {bits!r}")
    return 1 << bits


def decode_radius(side: float, bits: int, *, stochastic: bool = True) -> float:
    """The largest ||x - y||_inf at which a decode is guaranteed right (strictly below it)."""
    q = _check_bits(bits)
    return side * ((q - 2) if stochastic else (q - 1)) / 2


def side_for(distance: float, bits: int, *, margin: float = 2.0) -> float:
    """The side at which a reference `margin * distance` away (inf-norm) still decodes.

    Args:
        distance: expected ||x - y||_inf between the sender's vector and the receiver's reference.
        bits: bits per coordinate.
        margin: safety factor (> 0) on the distance.
    Raises:
        ValueError: for a negative or non-finite distance, or margin <= 0.
    """
    q = _check_bits(bits)
    if not np.isfinite(distance) or distance < 0:
        raise ValueError(f"distance must be finite and >= 0, got {distance!r}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    return 2.0 * margin * float(distance) / (q - 2)


def lattice_point(x: np.ndarray, side: float, rng: np.random.Generator | None) -> np.ndarray:
    """z = round(x / side) as int64: stochastic rounding with `rng`, nearest without."""
    t = np.asarray(x, dtype=np.float64) / side
    if rng is None:
        return np.rint(t).astype(np.int64)
    return np.floor(t + rng.random(t.shape)).astype(np.int64)


def digest(z: np.ndarray) -> bytes:
    """8-byte digest of a lattice point (its little-endian int64 bytes)."""
    return hashlib.blake2b(np.ascontiguousarray(z, dtype="<i8").tobytes(), digest_size=8).digest()


def packed_size(numel: int, bits: int) -> int:
    """Bytes of `numel` codes of `bits` bits."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Residues in [0, 2^bits) to bytes (4 bits: two per byte, low nibble first; little-endian)."""
    _check_bits(bits)
    if bits == 16:
        return codes.astype("<u2").tobytes()
    c = codes.astype(np.uint8)
    if bits == 8:
        return c.tobytes()
    if len(c) % 2:
        c = np.append(c, np.uint8(0))
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8).tobytes()


def unpack(buf: bytes, bits: int, numel: int) -> np.ndarray:
    """The inverse of `pack`, as int64 residues.

    Raises:
        ValueError: when `buf` is not exactly `packed_size(numel, bits)` bytes.
    """
    if len(buf) != packed_size(numel, bits):
        raise ValueError(f"lattice codes: {len(buf)} bytes for {numel} codes of {bits} bits, "
                         f"expected {packed_size(numel, bits)}")
    if bits == 16:
        return np.frombuffer(buf, dtype="<u2").astype(np.int64)
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        return raw.astype(np.int64)
    out = np.empty(2 * len(raw), dtype=np.int64)
    out[0::2] = raw & 0x0F
    out[1::2] = raw >> 4
    return out[:numel]


def encode(x: np.ndarray, side: float, bits: int, rng: np.random.Generator | None) -> LatticeCode:
    """Encode `x` on the lattice of side `side` (widened if |x|/side would exceed 2^50).

    Args:
        x: the vector (any float dtype; flattened).
        side: lattice side s (> 0).
        bits: bits per coordinate, one of BITS.
        rng: stochastic rounding's generator (unbiased); None rounds to nearest.
    Raises:
        ValueError: for non-finite x, a side that is not > 0, or bits outside BITS.
    """
    q = _check_bits(bits)
    x = np.asarray(x, dtype=np.float64).ravel()
    if not (np.isfinite(side) and side > 0):
        raise ValueError(f"lattice side must be finite and > 0, got {side!r}")
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.isfinite(top):
        raise ValueError("cannot encode a vector with NaN or Inf entries")
    side = max(float(side), top / _MAX_POINT)
    z = lattice_point(x, side, rng)
    return LatticeCode(bits=bits, side=side, numel=x.size, codes=pack(np.mod(z, q), bits),
                       check=digest(z))


def decode(code: LatticeCode, reference: np.ndarray) -> np.ndarray | None:
    """The vector `code` encodes, found as the lattice point nearest to `reference`.

    Returns:
        s * z' as float64, or None when the decode check fails (the reference is too far from
        the encoded vector; fall back to a full copy).
    Raises:
        ValueError: when the reference's size differs from the code's, or the codes are
            malformed (wrong length).
    """
    q = _check_bits(code.bits)
    y = np.asarray(reference, dtype=np.float64).ravel()
    if y.size != code.numel:
        raise ValueError(f"reference has {y.size} coordinates, the code {code.numel}")
    c = unpack(code.codes, code.bits, code.numel)
    z = c + q * np.rint((y / code.side - c) / q).astype(np.int64)
    if digest(z) != code.check:
        return None
    return z * code.side
