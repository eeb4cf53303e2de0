"""The integer budget: how far each worker may go so that the n-worker sum fits b bits.

What it owns: the per-worker clip bounds for a b-bit sum and their validation. What it must never
do: clip anything itself (the quantize kernel clips, with these bounds, and counts).

The bounds are [-(2^(b-1) // n), (2^(b-1) - 1) // n] with Python floor division on the magnitudes,
i.e. the float bounds [-2^(b-1)/n, (2^(b-1)-1)/n] truncated toward zero. That is exactly what the
IntSGD authors' code ends up with after casting the float bound to int8 (their int8 all-reduce),
and it guarantees n * lo >= -2^(b-1) and n * hi <= 2^(b-1) - 1: the sum of n clipped workers can
never wrap a b-bit (hence never an int32) adder, whatever the inputs. For n = 16, b = 8: [-8, 7].

Budget and lanes (`budget_for_lanes`). On the switch the sums travel in lanes of 8, 16 or 32 bits
(chosen per job at JOIN). A b-bit budget fits lanes of L bits iff b <= L: a budget wider than the
lanes is refused (its sums would wrap the lanes), naming both. When only the lanes are given, the
budget follows them (b = L: an 8-bit-lane job clips each worker to an 8-bit sum's share); when
only the budget is given, the lanes stay 32 bits wide (the int32 wire of before lanes existed).
"""

from __future__ import annotations

__all__ = ["VALID_BITS", "clip_bounds", "max_magnitude", "budget_for_lanes"]

#: Budgets the switch path supports: b bounds the sum; the lanes it travels in hold at least b.
VALID_BITS = (8, 16, 32)


def budget_for_lanes(bits: int | None, lane_bits: int | None) -> int:
    """The integer budget for a job whose sums travel in lanes of `lane_bits`.

    Args:
        bits: the budget asked for (8, 16, 32), or None: the lane width.
        lane_bits: the lane width (8, 16, 32), or None: 32-bit lanes.

    Returns:
        The budget b (<= the lane width).

    Raises:
        ValueError: bits or lane_bits is not 8, 16 or 32, or the budget is wider than the lanes
            (the message names both and what to change).
    """
    lanes = 32 if lane_bits is None else lane_bits
    if lanes not in VALID_BITS or isinstance(lanes, bool):
        raise ValueError(f"lane_bits must be one of {VALID_BITS}, got {lane_bits!r}")
    if bits is None:
        return lanes
    if bits not in VALID_BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    if bits > lanes:
        raise ValueError(f"an integer budget of {bits} bits (--bits {bits}) is wider than the "
                         f"job's {lanes}-bit lanes (--lane-bits {lanes}): its sums would wrap the "
                         f"lanes; use --bits {lanes} or less, or --lane-bits {bits}")
    return bits


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
