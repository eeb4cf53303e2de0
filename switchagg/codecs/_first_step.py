"""Step 0 of IntSGD and IntDIANA, before r is known: the three rules, one place.

What it owns: the rules a codec may take its first step with, their telemetry names, and the
first step's payloads for the two rules that are not SwitchML's. What it must never do: choose a
rule for the user, or exchange a float scale (every rule here is floatless, except that
"uncompressed" sends the floats themselves, as the paper does).

- "switchml" (default): SwitchML's per-packet exponent scaling (`heuristic.switchml_stream`):
  int8 exponents and int32 values, so it runs on the integer switch; one extra round, and max |Q_i|
  near 2^(b-1)/n.
- "fixed-alpha": Q_i = Int(alpha_0 g_i) with a constant alpha_0 (the authors' distributed code:
  `optimizer_reducer_alpha = 100`, "init value"); one SUM round, integers of the gradient's size
  times alpha_0 (clipped to the budget like any other step).
- "uncompressed": the float gradient's fp32 SUM (the paper and the authors' logistic-regression
  code: "the first step is uncompressed"). The switch adds integers only, so a codec with this rule
  runs over torch.distributed or the in-process group (`needs_float_sum`).
Whatever ran is the step's `StepTelemetry.scaling` (`SCALING`).
"""

from __future__ import annotations

from switchagg._choices import check_choice

__all__ = ["FIRST_STEP_DEFAULT", "FIXED_ALPHA", "SCALING", "check_first_step", "needs_float_sum"]

FIRST_STEP_DEFAULT = "switchml"
#: alpha_0 of "fixed-alpha": the authors' `optimizer_reducer_alpha`.
FIXED_ALPHA = 100.0
#: rule -> the telemetry's `scaling` of step 0.
SCALING = {"switchml": "first-step-heuristic", "fixed-alpha": "first-step-fixed-alpha",
           "uncompressed": "first-step-uncompressed"}


def check_first_step(rule: str, alpha0: float) -> str:
    """The rule, checked (ConfigError lists the valid ones); alpha0 must be a positive float."""
    check_choice("first_step", rule)
    if not (isinstance(alpha0, (int, float)) and 0 < float(alpha0) < 2.0 ** 100):
        raise ValueError(f"alpha0={alpha0!r}: the first step's fixed alpha must be a positive "
                         f"float")
    return rule


def needs_float_sum(options: dict) -> bool:
    """Whether a codec built with these options sends floats at step 0 (not on the switch)."""
    return options.get("first_step") == "uncompressed"
