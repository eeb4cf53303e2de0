"""switchagg: SwitchML-style in-network aggregation, emulated, for comparing integer gradient schemes.

Start here: `switchagg.SwitchClient` all-reduces int32 arrays through an emulated switch
(`switch-emulator`). The wire format is `switchagg.packet`, the control messages
`switchagg.protocol`, the errors `switchagg.errors`. The methods are codecs (`switchagg.codecs`,
registered in `switchagg.methods`), driven by the DDP hook (`switchagg.ddp.hook_for`) or the
in-process `switchagg.reducer`. The training harness (`switchagg compare`, `worker`, `reproduce`,
the tasks) is `switchagg.workers`, and `switchagg.compare` runs a comparison from Python. Heavier
parts (codecs, collectives, the DDP hook, GPU kernels) are imported on first use, so the switch
and CPU-only workers never load torch or cupy unless they need them.
"""

from __future__ import annotations

import importlib

from switchagg.errors import (
    ConfigError, DeviceUnavailable, JobAborted, JoinRejected, NonFiniteGradient, ProtocolError,
    SwitchError, SwitchTimeout,
)

__version__ = "0.1.0"

# Public names served lazily: name -> module that defines it.
_LAZY = {
    "SwitchClient": "switchagg.client",
    "ClientConfig": "switchagg.client",
    "ClientStats": "switchagg.client",
    # The comparison on a model and data of one's own (`switchagg.compare(model_fn, dataset_fn, ...)`).
    "compare": "switchagg.workers.api",
}

__all__ = ["SwitchError", "SwitchTimeout", "JoinRejected", "JobAborted", "ProtocolError",
           "NonFiniteGradient", "DeviceUnavailable", "ConfigError", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'switchagg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
