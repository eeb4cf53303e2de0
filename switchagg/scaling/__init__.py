"""Scaling rules: how a float gradient's scale is chosen before rounding (README.md, "The comparison job", lists them per method).

- `AlphaScaler`: IntSGD's floatless alpha (Algorithms 1 and 2), `switchagg.scaling.intsgd`.
- `block_scales`, `global_scale`: SwitchML's heuristic and its global variant, `.heuristic`.
- `clip_bounds`: the integer budget, `.budget`.
- `lookahead_fill`: SwitchML's exponent look-ahead on one switch stream call, `.lookahead`.
- `float_sq_norm`: a float32 tensor's squared norm as the same float64 on every worker and device
  (IntDIANA's full step, an uncompressed first step), `.exact_norm`.

Pure math: no I/O, no rounding, no communication.
"""

from switchagg.scaling.budget import VALID_BITS, budget_for_lanes, clip_bounds, max_magnitude
from switchagg.scaling.exact_norm import float_sq_norm
from switchagg.scaling.heuristic import block_scales, global_exponent, global_scale
from switchagg.scaling.intsgd import ALPHA_MAX, AlphaScaler
from switchagg.scaling.lookahead import NO_EXPONENT, lookahead_fill, lookahead_numel, lookahead_sums

__all__ = ["AlphaScaler", "ALPHA_MAX", "VALID_BITS", "budget_for_lanes", "clip_bounds",
           "max_magnitude",
           "block_scales", "global_exponent", "global_scale", "NO_EXPONENT", "lookahead_fill",
           "lookahead_numel", "lookahead_sums", "float_sq_norm"]
