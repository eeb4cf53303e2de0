"""`switchagg.codecs`: one file per method, each the only place its math lives.

See `_base` for the interface (begin, encode, decode, end; the payload kinds Sum, Stream, Max and
Gather) and its theory of operation. The registry of names is `switchagg.methods.METHODS`; the
drivers are `switchagg.ddp` (DDP communication hook) and `switchagg.reducer` (in-process).
The papers' baselines (QSGD, NatSGD, TernGrad, 1-bit SGD, PowerSGD, ISGQ) are gathered in
`baselines`; what the gather ones share (packing, per-block random streams) is in `_wire`.
"""

from switchagg.codecs._base import (
    Block, Bucket, Codec, Gather, IntegerCodec, Max, Payload, Stream, Sum, check_finite,
    non_finite_counts,
)
from switchagg.codecs.heuristic import HeuristicSwitchML
from switchagg.codecs.heuristic_global import HeuristicGlobal
from switchagg.codecs.intdiana import IntDIANA
from switchagg.codecs.intsgd import IntSGD
from switchagg.codecs.sgd import SGD

__all__ = ["Codec", "IntegerCodec", "Bucket", "Block", "Sum", "Stream", "Max", "Gather",
           "Payload", "check_finite", "non_finite_counts", "SGD", "IntSGD", "IntDIANA",
           "HeuristicSwitchML", "HeuristicGlobal"]
