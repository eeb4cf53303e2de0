"""`switchagg.ddp`: PyTorch DDP communication hooks for every method, summed in the emulated switch
where the method allows it.

Any registered method as a hook in your own DDP script:

    from switchagg.ddp import hook_for
    state, hook = hook_for("intsgd-random", switch="tcp://127.0.0.1:5555", lr=0.1)  # every rank
    ddp_model.register_comm_hook(state, hook)            # before the first backward()

or IntSGD's own names:

    from switchagg.ddp import IntSGDState, intsgd_hook
    state = IntSGDState("tcp://127.0.0.1:5555", lr=0.1)
    ddp_model.register_comm_hook(state, intsgd_hook)

What it owns: the hooks (`_hooks`: codec_hook and the named ones, noop_hook, and DDP's fp32
allreduce_hook as the reference) and their state (`_state.HookState`: the collective, the codec and
the iteration bookkeeping). What it must never do: hold any method math (the codecs in
`switchagg.codecs` do), let ranks disagree on a scale, or wait without a bound (the transports'
timeouts bound every call, and failures complete the Future DDP waits on).

How it works: DDP calls a hook per bucket, in the same order on every rank, with the bucket's
gradients not yet averaged. The hook has the codec encode the bucket on its own device (CPU or
CUDA), launches the payload's collective operation asynchronously and returns a torch Future at
once; when the result comes back (in the switch client's engine thread, or gloo's) a callback
decodes the average into the bucket's buffer. `state.step_telemetry()` after backward gives the
step's integer range, wire cost and time split.
"""

from switchagg.ddp._hooks import (
    IntSGDState, allreduce_hook, codec_hook, hook_for, intsgd_block_hook, intsgd_hook, noop_hook,
    switchml_hook,
)
from switchagg.ddp._state import HookState

__all__ = ["hook_for", "codec_hook", "HookState", "IntSGDState", "intsgd_hook",
           "intsgd_block_hook", "switchml_hook", "noop_hook", "allreduce_hook"]
