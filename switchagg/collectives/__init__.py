"""Collectives: one small interface (`Collective`), three implementations, under every codec.

- `LocalGroup` / `LocalCollective`: n simulated workers in one process (threads and a barrier).
- `TorchCollective`: torch.distributed (gloo on CPU, nccl on GPU).
- `SwitchCollective`: the emulated switch, through `switchagg.SwitchClient`.

The torch and switch implementations are imported on first use, so the local one loads neither.
"""

from __future__ import annotations

import importlib

from switchagg.collectives._base import Collective, CommStats, EncodeFn
from switchagg.collectives.local import LocalCollective, LocalGroup

_LAZY = {
    "TorchCollective": "switchagg.collectives.torchdist",
    "SwitchCollective": "switchagg.collectives.switch",
}

__all__ = ["Collective", "CommStats", "EncodeFn", "LocalGroup", "LocalCollective", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'switchagg.collectives' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
