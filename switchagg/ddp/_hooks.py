"""The DDP communication hooks: any registered method by name, IntSGD's and SwitchML's, no-op.

Each hook is a function of (state, bucket) returning a torch Future of the averaged bucket. One
function, `codec_hook`, does the work for every method: the state's codec encodes the bucket on
its device, the state's collective launches what the payload needs, and a callback decodes the
result into the bucket's buffer. `intsgd_hook`, `intsgd_block_hook` and `switchml_hook` bind an
`IntSGDState` to one method and call it. The fp32 reference is DDP's own
`torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook`, re-exported here.
"""

# No `from __future__ import annotations`: DDP's register_comm_hook inspects the annotations
# (bucket: dist.GradBucket, return torch.futures.Future[torch.Tensor]) as live objects.
import concurrent.futures
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from switchagg._choices import check_choice
from switchagg.codecs._base import non_finite_counts
from switchagg.ddp._state import HookState
from switchagg.errors import NonFiniteGradient, SwitchError
from switchagg.reducer import timed_stream

__all__ = ["codec_hook", "hook_for", "intsgd_hook", "intsgd_block_hook", "switchml_hook",
           "noop_hook", "allreduce_hook", "IntSGDState"]


def completed_future(value) -> torch.futures.Future:
    """A torch Future already holding value (a tensor) or, if it is an exception, failed with it.

    An exception is passed through a `.then` callback: `Future.set_exception` on a fresh future
    stores it as the value with a Python-side unwrap, which DDP's C++ side would try to cast to
    a tensor; raising it inside a callback marks the chained future failed for C++ too.
    """
    fut: torch.futures.Future = torch.futures.Future()
    if not isinstance(value, BaseException):
        fut.set_result(value)
        return fut
    fut.set_exception(value)
    return fut.then(_reraise)


def _reraise(done: torch.futures.Future):
    return done.value()  # raises the stored exception


def _check_finite(state: HookState, buf: torch.Tensor, index: int) -> None:
    """Raise NonFiniteGradient if the bucket holds NaN or Inf, aborting the switch job first:
    the other ranks then fail at once with JobAborted naming it instead of timing out."""
    counts = non_finite_counts(buf)
    if counts is None:
        return
    nans, infs = counts
    error = NonFiniteGradient(
        f"DDP bucket {index} ({buf.numel()} elements) holds {nans} NaN and {infs} Inf gradient "
        f"values on rank {state.rank}; nothing was sent and the switch job was aborted. Lower "
        f"the learning rate, clip gradients or use loss scaling.", rank=state.rank,
        field="bucket", value=index)
    state.close(reason=f"rank {state.rank}: non-finite gradient in DDP bucket {index}")
    raise error


def codec_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over all ranks with the state's method (any of `METHODS`).

    1. Check the bucket is finite (else abort the switch job and raise NonFiniteGradient).
    2. On the iteration's first bucket, begin the codec's iteration (IntSGD takes alpha_k).
    3. Encode the bucket on its device into the method's payload (int32 for the switch).
    4. Launch the payload's collective operation asynchronously (a MAX the codec needs first is
       waited for here, so every rank issues its calls in DDP's bucket order).
    5. When the result arrives, decode it into the bucket's buffer and complete the Future.

    Warning:
        Every rank must register the same hook with an equally configured state. A failure of
        the switch or of another rank completes the Future with its SwitchError, which DDP raises
        from backward() as a RuntimeError naming it; `state.error` keeps the typed error.

    Args:
        state: a `HookState` (from `hook_for`).
        bucket: the DDP gradient bucket (CPU or CUDA, not pre-divided by the world size).

    Returns:
        A Future of the bucket's buffer holding the average over ranks (same shape/dtype/device).

    Example::
        >>> state, hook = hook_for("intsgd-random", switch="tcp://127.0.0.1:5555", lr=0.1)
        >>> ddp_model.register_comm_hook(state, hook)
    """
    buf = bucket.buffer()
    _check_finite(state, buf, bucket.index())
    try:
        collective, codec = state._ready()
    except (SwitchError, ValueError) as exc:
        if state.error is None:
            state.error = exc
        return completed_future(exc)
    placed = state._bucket(bucket, codec, collective)
    x = buf.view(-1)
    out = x if x.dtype == torch.float32 else torch.empty(x.numel(), dtype=torch.float32,
                                                         device=x.device)
    t0 = time.perf_counter()
    t1 = t0
    try:
        payload = timed_stream(codec.encode(x, placed), state._streamed)
        t1 = time.perf_counter()
        payload, call = collective.launch(payload)   # a Max round is waited for here
    except BaseException as exc:
        state._launched_one(t0, t1, time.perf_counter(), bucket.is_last())
        state._completed_one(0.0, failed=True)
        if state.error is None:
            state.error = exc
        return completed_future(exc)
    state._launched_one(t0, t1, time.perf_counter(), bucket.is_last())
    fut: torch.futures.Future = torch.futures.Future()

    def decode_into_bucket(done: concurrent.futures.Future) -> None:
        # Runs where the reduction completes (the client's engine thread, gloo's thread): it
        # decodes and never submits another call (the ranks' call order must stay DDP's).
        t_start = time.perf_counter()
        try:
            codec.decode(done.result(), payload.ctx, out)
            if out is not x:
                x.copy_(out)
        except BaseException as exc:  # handed to DDP through the Future
            state._completed_one(time.perf_counter() - t_start, failed=True)
            if state.error is None:
                state.error = exc
            fut.set_exception(exc)
            return
        state._completed_one(time.perf_counter() - t_start, failed=False)
        fut.set_result(buf)

    call.add_done_callback(decode_into_bucket)
    return fut


def hook_for(name: str, switch: str | None = "tcp://127.0.0.1:5555", *, job: str = "ddp",
             world_size: int | None = None, rank: int | None = None, lr=1.0, seed: int = 0,
             **options) -> tuple[HookState, Callable]:
    """A DDP communication hook for any method of `switchagg.methods.METHODS`, with its state.

    Methods the switch can reduce (`collective_kind(name) == "int"`) sum through the switch at
    `switch` (None: over torch.distributed instead); the others (sgd, the gather compressors)
    use torch.distributed's default group and ignore `switch`.

    Args:
        name: the method.
        switch: the switch's endpoint.
        job: the switch job's name (the same on every rank; each method its own).
        world_size, rank: default to torch.distributed's.
        lr: the learning rate, or a callable returning it (IntSGD's alpha is proportional to it).
        seed: seed of the rounding stream (same on every rank).
        options: `HookState` settings (bits, lane_bits, config, timeout, client, collective,
            process_group)
            and the method's own (rounding, beta, eps, ...).

    Returns:
        (state, hook): register them with `ddp_model.register_comm_hook(state, hook)`.

    Raises:
        ConfigError: unknown method name (the message lists them). ValueError: a bad setting.

    Example::
        >>> state, hook = hook_for("intdiana", switch="tcp://127.0.0.1:5555", lr=0.1)
        >>> ddp_model.register_comm_hook(state, hook)
    """
    state = HookState(name, switch, job=job, world_size=world_size, rank=rank, lr=lr, seed=seed,
                      **options)
    return state, codec_hook


class IntSGDState(HookState):
    """State of `intsgd_hook`, `intsgd_block_hook` and `switchml_hook`: the hook chooses the method.

    Args:
        address: the switch's endpoint (or give `client`).
        rounding: "random" (unbiased, the default) or "deterministic" (round half to even), for
            the IntSGD hooks; the SwitchML hook always rounds to nearest, as SwitchML does.
        beta, eps, lr_rescale: IntSGD's r average and eps (`switchagg.scaling.AlphaScaler`).
        everything else: as `HookState`.
    """

    __slots__ = ("rounding", "beta", "eps", "lr_rescale")

    def __init__(self, address: str | None = None, *, client=None, rounding: str = "random",
                 beta: float = 0.9, eps: float = 1e-8, lr_rescale: bool = True, **settings) -> None:
        if address is None and client is None:
            raise ValueError("address: give the switch's address or an open client")
        check_choice("rounding", rounding)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r}: IntSGD's average needs beta in [0, 1)")
        if eps < 0:
            raise ValueError(f"eps={eps!r}: must be >= 0")
        self.rounding, self.beta, self.eps, self.lr_rescale = rounding, beta, eps, lr_rescale
        super().__init__(None, address, client=client, **settings)

    def _bind(self, method: str, **options) -> None:
        if self.method is None:
            self.method = method
            self.options = dict(options)
        elif self.method != method:
            raise ValueError(f"state: this IntSGDState serves {self.method!r}; build another "
                             f"one for {method!r}")

    @property
    def _scaler(self):
        return getattr(self._codec, "scaler", None)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(rounding=self.rounding, beta=self.beta, eps=self.eps,
                     lr_rescale=self.lr_rescale)
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("rounding", "beta", "eps", "lr_rescale"):
            setattr(self, name, state.pop(name))
        super().__setstate__(state)

    def _intsgd_options(self) -> dict:
        return dict(rounding=self.rounding, beta=self.beta, eps=self.eps,
                    lr_rescale=self.lr_rescale)


def intsgd_hook(state: IntSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through the switch with IntSGD's global alpha (Algorithm 1).

    1. Check the bucket is finite (else abort the switch job and raise NonFiniteGradient).
    2. Take alpha_k = eta_k / sqrt(2 n r_k / d + eps^2), one for the whole model, from r, the
       average of the exact squared lengths of past steps (integer sums only, so it is
       bit-identical on every rank). Iteration 0 has no r: it runs SwitchML's heuristic instead.
    3. Quantize Q = clip(Int(alpha_k g)) to the budget and launch the int32 SUM through the switch.
    4. When S returns, write S / (n alpha_k) into the bucket and record ||S||^2 for r_{k+1}.

    Args:
        state: an `IntSGDState`.
        bucket: the DDP gradient bucket.

    Returns:
        A Future of the bucket's buffer holding the average over ranks.

    Example::
        >>> state = IntSGDState("tcp://127.0.0.1:5555", lr=0.1)
        >>> ddp_model.register_comm_hook(state, intsgd_hook)
    """
    name = "intsgd-random" if state.rounding == "random" else "intsgd-determ"
    state._bind(name, **state._intsgd_options())
    return codec_hook(state, bucket)


def intsgd_block_hook(state: IntSGDState,
                      bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through the switch with one IntSGD alpha per parameter (Algorithm 2).

    1.-4. As `intsgd_hook`, with alpha_{k,l} per parameter l from its own r_l and size d_l (keyed
    by the parameter, so DDP's bucket rebuild does not move it).

    Warning:
        The parameter set must stay fixed after the first iteration.

    Example::
        >>> state = IntSGDState("tcp://127.0.0.1:5555", lr=0.1)
        >>> ddp_model.register_comm_hook(state, intsgd_block_hook)
    """
    state._bind("intsgd-block", **state._intsgd_options())
    return codec_hook(state, bucket)


def switchml_hook(state: IntSGDState,
                  bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket through the switch with SwitchML's per-packet exponent scaling.

    1. Check the bucket is finite (else abort the switch job and raise NonFiniteGradient).
    2. Each packet's block exponent e = floor(log2 max|g|) + 1 travels ahead (an exponent-only
       batch); the switch keeps the max over ranks.
    3. Chunk c is scaled by f_c = M / (n 2^e_max), rounded to nearest and summed.
    4. When the sums return, write S_c / (n f_c) per chunk into the bucket.

    Warning:
        Deterministic rounding is biased (no convergence theory); `state.rounding` is ignored.

    Example::
        >>> state = IntSGDState("tcp://127.0.0.1:5555")
        >>> ddp_model.register_comm_hook(state, switchml_hook)
    """
    state._bind("heuristic-switchml")
    return codec_hook(state, bucket)


def noop_hook(_, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Return the local gradient unchanged: no communication, for headroom measurements.

    Warning:
        Ranks no longer agree on gradients: their models drift apart. Use it only to measure how
        much of a step's time the reduction costs (as DDP's `debugging_hooks.noop_hook`).

    Example::
        >>> ddp_model.register_comm_hook(None, noop_hook)
    """
    return completed_future(bucket.buffer())
