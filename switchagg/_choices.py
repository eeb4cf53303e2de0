"""Every mode that takes one of a few named values, checked in one place.

What it owns: the valid values of each enumerated setting (rounding, alpha blocks, what a payload
needs of the network, kernel and dataplane implementations) and `check_choice`, which every layer
calls instead of comparing strings itself. What it must never do: hold defaults (the config
objects do) or import anything heavy: the switch imports it too.
"""

from __future__ import annotations

from switchagg.errors import ConfigError

__all__ = ["CHOICES", "check_choice"]

#: setting -> its valid values, in the order the help texts list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "rounding": ("random", "deterministic"),
    "blocks": ("global", "tensor"),
    "first_step": ("switchml", "fixed-alpha", "uncompressed"),
    "alpha_from": ("step", "innovation"),
    "need": ("sum", "max", "stream", "gather"),
    "cpu_kernels": ("numba", "numpy"),
    "dataplane": ("fast", "golden"),
}


def check_choice(setting: str, value: str) -> str:
    """Return value if it is a valid choice of setting, else raise ConfigError listing them.

    Raises:
        ConfigError: value is not one of CHOICES[setting] (also a ValueError).
    """
    valid = CHOICES[setting]
    if value not in valid:
        raise ConfigError(f"{setting}={value!r}: choose one of {', '.join(valid)}",
                          field=setting, value=value)
    return value
