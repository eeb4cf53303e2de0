"""`IntSGDState`: what the DDP hooks keep between buckets and iterations.

What it owns: the hyperparameters (switch address and job, rounding, budget, seed, learning rate,
IntSGD's beta/eps), the lazily opened `SwitchClient`, the iteration count, the alpha scaler and the
per-iteration bookkeeping that feeds it, and the statistics. What it must never do: quantize or
communicate (the private `_bucket` helpers do), or derive alpha from anything but integer sums every
worker holds (DESIGN.md §6: alpha must be bit-identical on every rank).

Why one global r (Algorithm 1) and per-parameter r (Algorithm 2), never per-bucket state. DDP
rebuilds its buckets after the first iteration (measured-limits.md §8.4): their number, sizes, order
and membership change, so state keyed by `bucket.index()` would be attached to different parameters
before and after the rebuild. Algorithm 1's r is a property of the whole model (d = every
parameter), so it does not care how the model is cut into buckets: every bucket of iteration k uses
alpha_k, the exact integer squared norms of all its sums add up (Python ints, order-free) to
||S^k||^2, and r is updated once per iteration. Algorithm 2 keys r by parameter (the same objects
before and after the rebuild), numbered in the order first seen; iteration 0 presents every
parameter in the same order on every rank, so the numbering agrees across ranks and runs.

Iteration bookkeeping. An iteration's buckets are launched in the same order on every rank (DDP
reduces buckets strictly in index order) and end on `bucket.is_last()`, where the step counter
moves. Their results arrive in the client's engine thread, in an order a retransmission can change,
so float observations are stored by launch position and combined in that order. DDP waits for every
bucket's future before backward() returns, so the first bucket of the next iteration finds the
previous one complete and folds it into the scaler (`_Iteration`), before computing its alpha.

First step. r is unknown at iteration 0; it runs SwitchML's heuristic per-packet scaling (int8
exponents only, no float exchanged) and seeds r with that step's exact length, as the IntSGD
method does (`switchagg._methods.intsgd`).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable

import numpy as np
import torch

from switchagg import kernels
from switchagg.errors import JobAborted, SwitchError
from switchagg.scaling import AlphaScaler, clip_bounds, max_magnitude

__all__ = ["IntSGDState"]

log = logging.getLogger(__name__)

_ROUNDINGS = ("random", "deterministic")
#: Hook families a state can serve; one state serves one of them (their r's differ in shape).
_MODES = ("global", "tensor", "heuristic")


class _Iteration:
    """One iteration's launches and the observations its results produced (thread-safe)."""

    def __init__(self, owner: IntSGDState, index: int, lr: float,
                 alpha: np.ndarray | None) -> None:
        self.owner, self.index, self.lr, self.alpha = owner, index, lr, alpha
        self.offset = 0            # elements launched so far: the Philox offset of the next bucket
        self.launched = 0
        self.completed = 0
        self.int_sq = 0            # alpha steps, global mode: sum of exact integer squared norms
        self.by_position: dict[int, float] = {}    # first step, global mode: ||bucket step||^2
        self.by_block: dict[int, float | int] = {}  # tensor mode: per parameter block
        self._lock = threading.Lock()

    def launch(self, numel: int) -> tuple[int, int]:
        """Reserve (position, offset) for a bucket of numel elements."""
        position, offset = self.launched, self.offset
        self.launched += 1
        self.offset += numel
        return position, offset

    def record(self, *, int_sq: int = 0, position: int | None = None, value: float = 0.0,
               blocks: dict | None = None, clipped: int = 0) -> None:
        """Record one bucket's result (called from the client's engine thread)."""
        with self._lock:
            self.owner.clipped += clipped
            self.int_sq += int_sq
            if position is not None:
                self.by_position[position] = value
            if blocks:
                self.by_block.update(blocks)
            self.completed += 1

    @property
    def complete(self) -> bool:
        with self._lock:
            return self.launched > 0 and self.completed == self.launched


class IntSGDState:
    """State of the switch hooks (`intsgd_hook`, `intsgd_block_hook`, `switchml_hook`).

    Args:
        address: the switch's endpoint, e.g. "tcp://127.0.0.1:5555"; the client is opened on the
            first bucket (every rank joins then). Give this or `client`.
        client: an open `switchagg.SwitchClient` to use instead (not closed by `close()`).
        job: the switch job's name (every rank the same). Default "ddp".
        world_size, rank: default to torch.distributed's (the rank keys the rounding stream).
        config: a `switchagg.ClientConfig` for the lazily opened client.
        timeout: overrides the config's join and op timeouts (seconds).
        token: the switch's (or the job's) token; kept out of checkpoints (`__getstate__`).
        rounding: "random" (unbiased, the default) or "deterministic" (round half to even),
            for the IntSGD hooks; the SwitchML hook always rounds to nearest, as SwitchML does.
        bits: integer budget of each sum, 8, 16 or 32: every worker clips to its share.
        seed: seed of the rounding stream (the same on every rank).
        lr: the learning rate the optimizer uses, or a zero-argument callable returning it (read
            once per iteration; it must agree on every rank). alpha is proportional to it.
        beta, eps, lr_rescale: IntSGD's r average and eps (`switchagg.scaling.AlphaScaler`).

    Raises:
        ValueError: a bad value or combination; the message names the parameter.
    """

    __slots__ = (
        # user hyperparameters
        "address", "job", "world_size", "rank", "config", "timeout", "rounding", "bits", "seed",
        "lr", "beta", "eps", "lr_rescale",
        # internal state
        "_client", "_owns_client", "_mode", "_scaler", "_block_keys", "_block_sizes",
        "_current", "_lo", "_hi", "_magnitude", "_lock", "_token",
        # statistics
        "iteration", "buckets", "elements", "clipped", "last_alpha", "error",
    )

    def __init__(self, address: str | None = None, *, client=None, job: str = "ddp",
                 world_size: int | None = None, rank: int | None = None, config=None,
                 timeout: float | None = None, rounding: str = "random", bits: int = 32,
                 seed: int = 0, lr: float | Callable[[], float] = 1.0, beta: float = 0.9,
                 eps: float = 1e-8, lr_rescale: bool = True, token: str = "") -> None:
        if (address is None) == (client is None):
            raise ValueError("address: give the switch's address or an open client, not both "
                             "nor neither")
        if client is not None:
            address, job = client.address, client.job
            world_size, rank = client.world_size, client.rank
        elif not isinstance(address, str) or "://" not in address:
            raise ValueError(f"address={address!r}: expected a ZeroMQ endpoint such as "
                             f"'tcp://127.0.0.1:5555'")
        if world_size is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"world_size={world_size!r}: expected an int >= 1")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding={rounding!r}: choose one of {_ROUNDINGS}")
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed={seed!r}: expected an int in [0, 2^64)")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
        if not callable(lr) and not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
            raise ValueError(f"lr={lr!r}: expected a positive finite learning rate or a callable "
                             f"returning one (alpha is proportional to it)")
        # AlphaScaler checks beta and eps; build a throwaway one so bad values fail here.
        try:
            AlphaScaler(1, [1], beta=beta, eps=eps)
        except ValueError as exc:
            raise ValueError(f"beta={beta!r}, eps={eps!r}: {exc}") from None
        self.address, self.job, self.world_size, self.rank = address, job, world_size, rank
        self.config, self.timeout, self.rounding = config, timeout, rounding
        self.bits, self.seed, self.lr = bits, seed, lr
        self.beta, self.eps, self.lr_rescale = float(beta), float(eps), bool(lr_rescale)
        self._client, self._owns_client = client, client is None
        self._token = token
        self._mode: str | None = None
        self._scaler: AlphaScaler | None = None
        self._block_keys: dict[int, int] = {}
        self._block_sizes: list[int] = []
        self._current: _Iteration | None = None
        self._lo = self._hi = self._magnitude = None
        self._lock = threading.Lock()
        self.iteration = self.buckets = self.elements = self.clipped = 0
        self.last_alpha: np.ndarray | None = None
        self.error: BaseException | None = None
        if world_size is not None:
            self._budget(world_size)  # bits: fail now, not on the first bucket
        log.info("IntSGDState: switch %s job %r, world size %s, rank %s, rounding %s, %d-bit "
                 "budget, seed %d, lr %s, beta %g, eps %g, lr_rescale %s", address, job,
                 world_size, rank, rounding, bits, seed, "callable" if callable(lr) else lr,
                 self.beta, self.eps, self.lr_rescale)

    # ---- public ----------------------------------------------------------------------------

    @property
    def client(self):
        """The SwitchClient, opened (joined) on first access.

        Raises:
            SwitchTimeout / JoinRejected: from joining (the message names the address).
        """
        with self._lock:
            if self._client is None:
                if self.error is not None:
                    raise self.error
                from switchagg.client import SwitchClient
                _warm_up_kernels(self.config.k if self.config is not None else 64)
                try:
                    self._client = SwitchClient(self.address, self.job, self._world(),
                                                self.rank, config=self.config,
                                                timeout=self.timeout, token=self._token)
                except SwitchError as exc:
                    self.error = exc
                    raise
                self.world_size, self.rank = self._client.world_size, self._client.rank
            return self._client

    @property
    def alpha(self) -> np.ndarray | None:
        """The alpha of the latest IntSGD iteration (one per block), None on heuristic steps."""
        return self.last_alpha

    def close(self, reason: str = "") -> None:
        """Leave the switch job (a non-empty reason aborts it for every rank)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close(reason=reason)
        if reason and self.error is None:
            self.error = JobAborted(f"this rank left job {self.job!r}: {reason}", job=self.job)

    def __getstate__(self) -> dict:
        """Everything but the client, lock and per-iteration bookkeeping (a checkpoint)."""
        lr = self._lr_now() if callable(self.lr) else self.lr
        self._fold_finished()
        state = {name: getattr(self, name) for name in self.__slots__
                 if not name.startswith("_") and name != "error"}
        if callable(self.lr):
            log.warning("IntSGDState pickled with lr=%.6g, the current value of its lr "
                        "callable; set state.lr again after loading to follow the schedule", lr)
            state["lr"] = lr
        state.update(mode=self._mode, block_sizes=list(self._block_sizes), scaler=None)
        if self._scaler is not None:
            state["scaler"] = dict(self._scaler.state_dict(), d=self._scaler.d.tolist())
        return state

    def __setstate__(self, state: dict) -> None:
        scaler = state.pop("scaler")
        mode, sizes = state.pop("mode"), state.pop("block_sizes")
        for name, value in state.items():
            setattr(self, name, value)
        self._client, self._owns_client, self._token = None, True, ""
        self._mode, self._block_sizes, self._block_keys = mode, sizes, {}
        self._current, self._lock, self.error = None, threading.Lock(), None
        self._lo = self._hi = self._magnitude = None
        self._scaler = None
        if scaler is not None:
            self._scaler = self._make_scaler(scaler.pop("d"))
            self._scaler.load_state_dict(scaler)

    # ---- used by the hooks -----------------------------------------------------------------

    def _world(self) -> int:
        if self.world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("world_size: pass it, or initialize torch.distributed first")
            self.world_size, self.rank = (torch.distributed.get_world_size(),
                                          torch.distributed.get_rank())
        return self.world_size

    def _budget(self, world_size: int) -> tuple[int, int, int]:
        """(lo, hi, M) of the integer budget; raises ValueError naming `bits`."""
        if self._lo is None:
            try:
                self._lo, self._hi = clip_bounds(self.bits, world_size)
            except ValueError as exc:
                raise ValueError(f"bits={self.bits!r}: {exc}") from None
            self._magnitude = max_magnitude(self.bits)
        return self._lo, self._hi, self._magnitude

    def _use(self, mode: str) -> None:
        """Bind this state to one hook family on first use."""
        if self._mode is None:
            self._mode = mode
        elif self._mode != mode:
            raise ValueError(f"state: this IntSGDState serves the {self._mode!r} hook; build "
                             f"another one for the {mode!r} hook")

    def _make_scaler(self, sizes) -> AlphaScaler:
        return AlphaScaler(self._world(), sizes, beta=self.beta, eps=self.eps,
                           lr_rescale=self.lr_rescale)

    def _lr_now(self) -> float:
        lr = float(self.lr() if callable(self.lr) else self.lr)
        if not 0 < lr < math.inf:
            raise ValueError(f"lr={lr!r}: the learning rate must be positive and finite")
        return lr

    def _begin_bucket(self, numel: int, mode: str) -> tuple[_Iteration, int, int]:
        """The current iteration (folding the previous one first) and this bucket's slot in it."""
        self._use(mode)
        it = self._current
        if it is None or it.index != self.iteration:
            self._fold_finished()
            lr = self._lr_now()
            alpha = None
            if mode != "heuristic" and self._scaler is not None:
                alpha = self._scaler.alpha(lr)
                self.last_alpha = alpha
            it = self._current = _Iteration(self, self.iteration, lr, alpha)
        position, offset = it.launch(numel)
        self.buckets += 1
        self.elements += numel
        return it, position, offset

    def _end_bucket(self, is_last: bool) -> None:
        if is_last:
            self.iteration += 1

    def _block_key(self, param: torch.Tensor, numel: int) -> int:
        """Stable number of a parameter block (first-seen order); checks its size."""
        key = self._block_keys.get(id(param))
        if key is None:
            key = len(self._block_keys)
            if key < len(self._block_sizes):  # restored from a checkpoint: same order, check sizes
                if self._block_sizes[key] != numel:
                    raise ValueError(f"state: parameter block {key} has {numel} elements, the "
                                     f"checkpoint {self._block_sizes[key]}; load the state into "
                                     f"the model it was saved from")
            elif self._scaler is not None:
                raise ValueError(f"state: a parameter of {numel} elements appeared after the "
                                 f"first iteration; intsgd_block_hook needs a fixed parameter set")
            else:
                self._block_sizes.append(numel)
            self._block_keys[id(param)] = key
        return key

    def _fold_finished(self) -> None:
        """Feed a finished iteration's observations to the scaler (creating it after step 0)."""
        it = self._current
        if it is None or not it.complete:
            return  # nothing yet, or a failed bucket: the job is broken anyway
        self._current = None
        if self._mode == "heuristic":
            return
        lr = it.lr
        if self._mode == "global":
            if self._scaler is None:
                self._scaler = self._make_scaler([it.offset])
            if it.alpha is None:  # first step: float lengths, summed in launch order
                step_sq = sum(it.by_position[p] for p in range(it.launched)) * (lr * lr)
            else:
                step_sq = self._scaler.step_sq_from_sum([it.int_sq], it.alpha, lr)
        else:
            if self._scaler is None:
                self._scaler = self._make_scaler(self._block_sizes)
            values = [it.by_block.get(key, 0) for key in range(len(self._block_sizes))]
            if it.alpha is None:
                step_sq = np.array(values, dtype=np.float64) * (lr * lr)
            else:
                step_sq = self._scaler.step_sq_from_sum(values, it.alpha, lr)
        self._scaler.observe(step_sq, lr)


def _warm_up_kernels(k: int) -> None:
    """Compile the kernels the engine thread runs (fills, decodes) before joining.

    A first-call JIT compilation inside the client's engine thread would silence its heartbeats
    long enough for the switch to declare the worker dead (as `SwitchCollective` notes).
    """
    # DDP's buckets (25 MiB by default) take the multi-threaded kernels: load those too.
    kernels.warm_up(parallel=True)
    x = np.zeros(k, np.float32)
    kernels.quantize(x, np.ones(1, np.float32), rounding="deterministic", block=k)
    kernels.quantize(x, 1.0, rounding="random")
    kernels.block_exponents(x, k)
    sums = np.zeros(k, np.int32)
    kernels.dequantize(sums, 1.0)
    kernels.dequantize(sums, np.ones(1), block=k)
    kernels.int_squared_norm(sums)
