"""The public DDP communication hooks: IntSGD (global and per-parameter alpha), SwitchML, no-op.

Each hook is a function of (state, bucket) returning a torch Future of the averaged bucket
(measured-limits.md §8.4); the work is in `_bucket` (one bucket's way) and `_state` (what is
kept between buckets). The fp32 reference is DDP's own
`torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook`, re-exported here.
"""

# No `from __future__ import annotations`: DDP's register_comm_hook inspects the annotations
# (bucket: dist.GradBucket, return torch.futures.Future[torch.Tensor]) as live objects.
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from switchagg.ddp._bucket import (
    check_finite, completed_future, launch_heuristic, launch_intsgd, open_client,
)
from switchagg.ddp._state import IntSGDState

__all__ = ["intsgd_hook", "intsgd_block_hook", "switchml_hook", "noop_hook", "allreduce_hook"]


def _run(state: IntSGDState, bucket: dist.GradBucket, mode: str) -> torch.futures.Future:
    """Shared body: check, open the client, reserve the bucket's place, launch, count the step."""
    buf = bucket.buffer()
    check_finite(state, buf, bucket.index())
    client = open_client(state)
    if isinstance(client, BaseException):
        return completed_future(client)
    it, position, offset = state._begin_bucket(buf.numel(), mode)
    try:
        if mode == "heuristic":
            return launch_heuristic(state, client, bucket, it, position, observe=False)
        blocks = mode == "tensor"
        if it.alpha is None:  # IntSGD's first step: r unknown, SwitchML's scaling seeds it
            return launch_heuristic(state, client, bucket, it, position, observe=True,
                                    blocks=blocks)
        return launch_intsgd(state, client, bucket, it, offset, blocks=blocks)
    finally:
        state._end_bucket(bucket.is_last())


def intsgd_hook(state: IntSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through the switch with IntSGD's global alpha (Algorithm 1).

    1. Check the bucket is finite (else abort the switch job and raise NonFiniteGradient).
    2. Take alpha_k of this iteration: eta_k / sqrt(2 n r_k / d + eps^2), one for the whole model,
       from r, the average of the exact squared lengths of past steps (integer sums only, so it is
       bit-identical on every rank). Iteration 0 has no r: it runs SwitchML's heuristic instead.
    3. Quantize Q = clip(Int(alpha_k g)) to the budget (randomized, or deterministic rounding as
       the state says) and launch the int32 SUM S of all ranks' Q through the switch.
    4. When S returns, write S / (n alpha_k) into the bucket and record ||S||^2 for r_{k+1}.

    Warning:
        Every rank must register the same hook with an equally configured state. The client
        joins the switch on the first bucket (every rank at once). A failure of the switch or of
        another rank completes the Future with its SwitchError, which DDP raises from backward()
        as a RuntimeError naming it; `state.error` keeps the typed error.

    Args:
        state: an `IntSGDState` (switch address, rounding, budget, seed, learning rate).
        bucket: the DDP gradient bucket (CPU or CUDA, not pre-divided by the world size).

    Returns:
        A Future of the bucket's buffer holding the average over ranks (same shape/dtype/device).

    Example::
        >>> state = IntSGDState("tcp://127.0.0.1:5555", lr=0.1)
        >>> ddp_model.register_comm_hook(state, intsgd_hook)
    """
    return _run(state, bucket, "global")


def intsgd_block_hook(state: IntSGDState,
                      bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through the switch with one IntSGD alpha per parameter (Algorithm 2).

    1. Check the bucket is finite (else abort the switch job and raise NonFiniteGradient).
    2. Take alpha_{k,l} for each parameter l of the bucket, from its own r_l and size d_l (keyed
       by the parameter, so DDP's bucket rebuild does not move it). Iteration 0 runs SwitchML's
       heuristic and seeds every r_l.
    3. Quantize each parameter's slice with its alpha and launch one int32 SUM for the bucket.
    4. When S returns, write S_l / (n alpha_{k,l}) per slice and record each ||S_l||^2.

    Warning:
        The parameter set must stay fixed after the first iteration. Failures surface as with
        `intsgd_hook`.

    Args:
        state: an `IntSGDState` not used with another hook.
        bucket: the DDP gradient bucket.

    Returns:
        A Future of the bucket's buffer holding the average over ranks.

    Example::
        >>> state = IntSGDState("tcp://127.0.0.1:5555", lr=0.1)
        >>> ddp_model.register_comm_hook(state, intsgd_block_hook)
    """
    return _run(state, bucket, "tensor")


def switchml_hook(state: IntSGDState,
                  bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through the switch with SwitchML's per-packet exponent scaling.

    1. Check the bucket is finite (else abort the switch job and raise NonFiniteGradient).
    2. Compute each packet's block exponent e = floor(log2 max|g|) + 1; an exponent-only batch
       of s packets takes them to the switch, which keeps the max over ranks.
    3. Packet c + s carries chunk c scaled by f_c = M / (n 2^e_max) and rounded to nearest, in
       the same stream call (look-ahead), so no float is exchanged and the sum cannot overflow.
    4. When the sums return, write S_c / (n f_c) per chunk into the bucket.

    Warning:
        Deterministic rounding is biased (no convergence theory); `state.rounding` is ignored.
        Buckets of fewer than s chunks also carry s - chunks padding packets (see `_bucket`).

    Args:
        state: an `IntSGDState` (its lr, beta and eps are unused).
        bucket: the DDP gradient bucket.

    Returns:
        A Future of the bucket's buffer holding the average over ranks.

    Example::
        >>> state = IntSGDState("tcp://127.0.0.1:5555")
        >>> ddp_model.register_comm_hook(state, switchml_hook)
    """
    return _run(state, bucket, "heuristic")


def noop_hook(_, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Return the local gradient unchanged: no communication, for headroom measurements.

    1. Wrap the bucket's buffer in a completed Future.

    Warning:
        Ranks no longer agree on gradients: their models drift apart. Use it only to measure how
        much of a step's time the reduction costs (as DDP's `debugging_hooks.noop_hook`).

    Args:
        _: ignored (pass None).
        bucket: the DDP gradient bucket.

    Returns:
        A completed Future of the bucket's buffer, untouched.

    Example::
        >>> ddp_model.register_comm_hook(None, noop_hook)
        >>> loss.backward()  # no all-reduce
    """
    return completed_future(bucket.buffer())
