"""The papers' baselines, one file each: QSGD, NatSGD, TernGrad, 1-bit SGD with error feedback,
PowerSGD and ISGQ (what the IntSGD and ISGQ papers compared against). Re-exported here so that the
registry (`switchagg.methods`) imports them in one line; `_wire` holds what the gather ones share.
"""

from switchagg.codecs.isgq import ISGQ
from switchagg.codecs.natsgd import NatSGD
from switchagg.codecs.onebit import OneBitEF
from switchagg.codecs.powersgd import PowerSGD
from switchagg.codecs.qsgd import QSGD
from switchagg.codecs.terngrad import TernGrad, TernGradSwitch

__all__ = ["QSGD", "NatSGD", "TernGrad", "TernGradSwitch", "OneBitEF", "PowerSGD", "ISGQ"]
