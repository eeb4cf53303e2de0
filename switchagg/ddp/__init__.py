"""`switchagg.ddp`: PyTorch DDP communication hooks that sum each gradient bucket in the emulated switch.

Drop IntSGD-over-a-switch into an existing DDP script (DESIGN.md §8):

    from switchagg.ddp import IntSGDState, intsgd_hook
    state = IntSGDState("tcp://127.0.0.1:5555", lr=0.1)   # same on every rank
    ddp_model.register_comm_hook(state, intsgd_hook)      # before the first backward()

What it owns: the hooks (`_hooks`: intsgd_hook, intsgd_block_hook, switchml_hook, noop_hook, and
DDP's fp32 allreduce_hook as the reference), their state (`_state.IntSGDState`) and one bucket's way
through the switch (`_bucket`). What it must never do: re-implement a scaling rule (alpha comes from
`switchagg.scaling.AlphaScaler`, SwitchML's scales from `switchagg.scaling.block_scales`, the budget
from `clip_bounds`), let ranks disagree on a scale, or wait without a bound (the client's timeouts
bound every call, and failures complete the Future DDP waits on).

How it works: DDP calls a hook per bucket, in the same order on every rank, with the bucket's
gradients summed locally but not averaged. The hook quantizes the bucket to int32 with this
iteration's scale, launches the client's asynchronous all-reduce and returns a torch Future at
once; when the switch's sum comes back (in the client's engine thread) a `.then` callback decodes
the average into the bucket's buffer. The state counts iterations on the last bucket and feeds the
exact squared norm of each integer sum to IntSGD's r.
"""

from switchagg.ddp._hooks import (
    allreduce_hook, intsgd_block_hook, intsgd_hook, noop_hook, switchml_hook,
)
from switchagg.ddp._state import IntSGDState

__all__ = ["IntSGDState", "intsgd_hook", "intsgd_block_hook", "switchml_hook", "noop_hook",
           "allreduce_hook"]
