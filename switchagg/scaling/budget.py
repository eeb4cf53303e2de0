"""The integer budget: how far each worker may go so that the n-worker sum fits b bits.

What it owns: the per-worker clip bounds for a b-bit sum and their validation. What it must never
do: clip anything itself (the quantize kernel clips, with these bounds, and counts).

The bounds are [-(2^(b-1) // n), (2^(b-1) - 1) // n] with Python floor division on the magnitudes,
i.e. the float bounds [-2^(b-1)/n, (2^(b-1)-1)/n] truncated toward zero. That is exactly what the
IntSGD authors' code ends up with after casting the float bound to int8 (their int8 all-reduce),
and it guarantees n * lo >= -2^(b-1) and n * hi <= 2^(b-1) - 1: the sum of n clipped workers can
never wrap a b-bit (hence never an int32) adder, whatever the inputs. For n = 16, b = 8: [-8, 7].
"""

from __future__ import annotations

__all__ = ["VALID_BITS", "clip_bounds", "max_magnitude"]

#: Budgets the switch path supports: the sum travels as int32 whatever b is; b only bounds it.
VALID_BITS = (8, 16, 32)


def clip_bounds(bits: int, world_size: int) -> tuple[int, int]:
    """Per-worker integer bounds (lo, hi) for a b-bit sum over world_size workers.

    Raises:
        ValueError: bits not in VALID_BITS, or a budget too small to give each worker a nonzero range.
    """
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    half = 1 << (bits - 1)
    lo, hi = -(half // world_size), (half - 1) // world_size
    if hi < 1:
        raise ValueError(f"a {bits}-bit sum over {world_size} workers leaves each worker no "
                         f"positive integer (hi = {hi}); use more bits or fewer workers")
    return lo, hi


def max_magnitude(bits: int) -> int:
    """Largest positive value of a b-bit sum: the M in SwitchML's scale f = M / (n 2^e)."""
    return (1 << (bits - 1)) - 1
