"""Philox4x32-10, the counter-based generator behind randomized rounding, and how bits map to elements.

What it owns: the numpy reference of Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC'11; the Random123 library), and the one rule that turns (seed, rank, step, element
index) into 32 random bits. Every backend (numba, CUDA) must reproduce `element_bits` bit for bit;
tests hold all of them to this module, and this module to the published Random123 known answers.

What it must never do: keep state. A counter-based generator is a pure function of (counter, key), so
a gradient quantized in pieces, on another device, or after a restart gets the same bits.

How it works:
- One Philox4x32-10 call maps a 128-bit counter and a 64-bit key to 128 random bits (4 words).
  A round multiplies counter words 0 and 2 by 0xD2511F53 and 0xCD9E8D57 into 64-bit products and
  mixes the high halves with the other words and the key; the key is bumped by the Weyl constants
  0x9E3779B9 and 0xBB67AE85 between rounds. Ten rounds.
- Keying (this project's rule): key = (seed mod 2^32, seed div 2^32); the element with global index g
  uses word g mod 4 of the call with counter (q mod 2^32, q div 2^32, step, rank), q = g div 4.
  So every element gets its own bits, no two (rank, step) share a stream, and four consecutive
  elements share one call (the kernels compute it once per group of four).
- The uniform is u = bits / 2^32 in [0, 1), exact in float64; rounding goes up iff u < frac(t).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "KNOWN_ANSWERS", "philox4x32_10",
           "element_bits", "check_stream_ids"]

PHILOX_M0 = 0xD2511F53  #: multiplier of counter word 0 (Random123 PHILOX_M4x32_0)
PHILOX_M1 = 0xCD9E8D57  #: multiplier of counter word 2 (Random123 PHILOX_M4x32_1)
PHILOX_W0 = 0x9E3779B9  #: key bump of key word 0 (golden ratio, Random123 PHILOX_W32_0)
PHILOX_W1 = 0xBB67AE85  #: key bump of key word 1 (sqrt(3) - 1, Random123 PHILOX_W32_1)
_ROUNDS = 10

#: Random123's published known-answer vectors for philox4x32 R=10 (kat_vectors): counter, key, output.
KNOWN_ANSWERS = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counters: np.ndarray, key) -> np.ndarray:
    """Apply Philox4x32-10 to a batch of counters under one key.

    Args:
        counters: (N, 4) array of uint32 counter words (word 0 first).
        key: two uint32 key words.

    Returns:
        (N, 4) uint32 array of random words.

    Raises:
        ValueError: counters not of shape (N, 4), or key not two words.
    """
    c = np.asarray(counters)
    if c.ndim != 2 or c.shape[1] != 4:
        raise ValueError(f"counters must have shape (N, 4), got {c.shape}")
    k = np.asarray(key, dtype=np.uint64).reshape(-1)
    if k.size != 2:
        raise ValueError(f"key must be two uint32 words, got {k.size}")
    c0, c1, c2, c3 = (c[:, i].astype(np.uint32).astype(np.uint64) for i in range(4))
    k0, k1 = int(k[0]) & 0xFFFFFFFF, int(k[1]) & 0xFFFFFFFF
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for r in range(_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
            k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
        p0 = c0 * m0  # 32 x 32 -> 64 bits: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _MASK32)
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def check_stream_ids(seed: int, rank: int, step: int, offset: int) -> None:
    """Reject stream identifiers that the keying rule cannot represent.

    Raises:
        ValueError: seed outside [0, 2^64), rank or step outside [0, 2^32), offset outside [0, 2^62)
            (kernels index elements with signed 64-bit integers).
    """
    for name, value, bits in (("seed", seed, 64), ("rank", rank, 32), ("step", step, 32)):
        if not 0 <= int(value) < (1 << bits):
            raise ValueError(f"{name}={value} is outside [0, 2^{bits}); reduce it modulo 2^{bits}")
    if not 0 <= int(offset) < (1 << 62):
        raise ValueError(f"offset={offset} must be in [0, 2^62) (the global index of the first element)")


def element_bits(seed: int, rank: int, step: int, offset: int, n: int) -> np.ndarray:
    """The 32 random bits of elements offset .. offset + n - 1 (the keying rule above).

    Args:
        seed, rank, step: the stream (see `check_stream_ids` for ranges).
        offset: global index of the first element.
        n: number of elements.

    Returns:
        uint32 array of n words.
    """
    check_stream_ids(seed, rank, step, offset)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    first, last = offset // 4, (offset + n - 1) // 4
    q = np.arange(first, last + 1, dtype=np.uint64)
    counters = np.empty((q.size, 4), dtype=np.uint32)
    counters[:, 0] = q & _MASK32
    counters[:, 1] = q >> np.uint64(32)
    counters[:, 2] = step
    counters[:, 3] = rank
    words = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).reshape(-1)
    start = offset - 4 * first
    return words[start:start + n]
