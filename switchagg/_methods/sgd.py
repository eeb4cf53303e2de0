"""sgd: full-precision baseline. Wire: the fp32 gradient; one fp32 SUM all-reduce; divide by n."""

from __future__ import annotations

import numpy as np

from switchagg._methods._base import Layout, Method
from switchagg.telemetry import StepTelemetry

__all__ = ["SGD"]


class SGD(Method):
    """fp32 all-reduce of the gradient (no compression, no integer budget)."""

    name = "sgd"
    collective_kind = "float"

    def _reduce_flat(self, x: np.ndarray, layout: Layout, step: int, lr: float,
                     tel: StepTelemetry) -> np.ndarray:
        tel.scaling = "float"
        with self._timed("t_communicate"):
            total = self.collective.allreduce_float(x)
        with self._timed("t_decode"):
            return total / np.float32(self.n)
