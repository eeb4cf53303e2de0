"""What one gradient reduction cost and how close it came to the integer limits, per step.

What it owns: `StepTelemetry`, the record of one step of one worker that both drivers (the DDP
hook and the in-process `Reducer`) return, and the integer summaries it is built from. What it must
never do: time or communicate anything itself; codecs fill in the integers, drivers the costs and
times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["StepTelemetry", "int_summary", "bits_needed"]


@dataclass
class StepTelemetry:
    """One worker's record of one `Method.reduce` call.

    Attributes:
        method: the method's registry name.
        step: the step number the caller passed.
        numel: gradient elements reduced.
        numel_int: elements this worker turned into integers (the telemetry's integer fields
            cover these).
        scaling: how the scale was chosen this step ("alpha", "first-step-heuristic",
            "first-step-fixed-alpha", "first-step-uncompressed", "block-exponent",
            "global-exponent", "float").
        alpha: the scalar scale (None for per-block or per-packet scales, or float methods).
        alpha_min, alpha_max: the range of the scales used (per block / per packet / scalar).
        max_abs_q: max |Q_i| of this worker's integers (0 for float methods).
        max_abs_sum: max |sum over workers| (0 for float methods).
        sum_bits: two's-complement bits the sum needed (1 + bit length of its extremes).
        clipped: elements this worker clipped to the integer budget.
        clip_fraction: clipped / numel.
        zero_fraction: fraction of this worker's integers that are 0.
        wraps: packets whose int32 sum wrapped (as the collective saw them).
        bytes_sent, bytes_received, packets_sent, packets_received, rounds: wire cost this step
            (the collective's count of what it really moved, packed as sent).
        paper_bits: the bits this worker's payload takes in the method's paper's own encoding
            (e.g. QSGD's Elias code, TernGrad's 2 bits, 9 bits per NatSGD coordinate); 0 where the
            method has no paper count other than what it sends.
        extra_rounds: rounds beyond the one SUM (the heuristic's exponent batch or MAX round).
        t_quantize, t_communicate, t_decode: seconds spent scaling+rounding, in collectives,
            decoding (including the scale update).
        t_exposed: seconds backward waited for communication after its last bucket was
            launched (DDP hook; 0 in-process, where nothing overlaps).
    """

    method: str
    step: int
    numel: int = 0
    numel_int: int = 0
    scaling: str = ""
    alpha: float | None = None
    alpha_min: float | None = None
    alpha_max: float | None = None
    max_abs_q: int = 0
    max_abs_sum: int = 0
    sum_bits: int = 0
    clipped: int = 0
    clip_fraction: float = 0.0
    zero_fraction: float = 0.0
    wraps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    rounds: int = 0
    paper_bits: int = 0
    extra_rounds: int = 0
    t_quantize: float = 0.0
    t_communicate: float = 0.0
    t_decode: float = 0.0
    t_exposed: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def bits_needed(lo: int, hi: int) -> int:
    """Bits of a two's-complement integer type that holds every value in [lo, hi]."""
    def need(v: int) -> int:  # v >= 0 needs bit_length + 1; v < 0 needs bit_length of -v - 1, + 1
        return 1 + (v.bit_length() if v >= 0 else (-v - 1).bit_length())
    return max(need(int(lo)), need(int(hi)))


def int_summary(values: np.ndarray) -> tuple[int, int, float]:
    """(max |v|, bits needed, fraction of zeros) of an integer array, computed without overflow."""
    if values.size == 0:
        return 0, 1, 0.0
    lo, hi = int(values.min()), int(values.max())
    zeros = float(np.count_nonzero(values == 0)) / values.size
    return max(abs(lo), abs(hi)), bits_needed(lo, hi), zeros
