"""sgd: the full-precision baseline. Wire: the fp32 gradient, one fp32 SUM; decode: divide by n.

Unbiased and exact up to float32 addition order. It needs torch.distributed (the switch adds
int32 only).
"""

from __future__ import annotations

import torch

from switchagg.codecs._base import Bucket, Codec, Sum

__all__ = ["SGD"]


class SGD(Codec):
    """fp32 all-reduce of the gradient (no compression, no integer budget)."""

    needs = ("sum",)
    wire_dtype = "float32"
    unbiased = True

    def encode(self, x: torch.Tensor, bucket: Bucket) -> Sum:
        return Sum(x.to(torch.float32))

    def decode(self, reduced, ctx, out: torch.Tensor) -> None:
        torch.div(reduced, self.n, out=out)
        with self._lock:
            self.tel.scaling = "float"
