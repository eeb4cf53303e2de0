"""`HookState`: what the codec hook keeps between buckets and iterations.

What it owns: the hyperparameters (method, switch address and job, budget and lane width, seed,
learning rate,
the method's own options), the lazily built collective (a `SwitchClient` for methods the switch
can reduce, torch.distributed otherwise) and codec, the iteration bookkeeping (bucket positions,
offsets, stable parameter keys), the step's telemetry and the statistics. What it must never do:
quantize or decode (the codec does), communicate (the collective does), or block in a callback.

Lifetime. The job on the switch ends with the state: `close()` LEAVEs it; a state dropped without
close (its DDP model deleted) LEAVEs from its finalizer; a program that ends without either
LEAVEs at interpreter exit (`switchagg.client` closes every open client), and one killed outright
is dropped by the switch when its connection closes. So the job's name is free again for the
next run.

Iteration bookkeeping. DDP calls the hook once per bucket, in the same order on every rank, and
ends an iteration on `bucket.is_last()`. The first bucket of an iteration calls `codec.begin`
(which folds the previous iteration: DDP waited for all of its futures before backward returned);
each bucket gets its position, the offset of its first element in the iteration (the rounding
stream's offset, so buckets never share random numbers) and one block per parameter, keyed by the
parameter's first-seen order: the same objects before and after DDP's bucket rebuild, numbered the
same on every rank because iteration 0 presents them in the same order everywhere.

Telemetry. `step_telemetry()` (the training loop calls it after backward) closes the iteration:
`codec.end()`, then the wire cost from the collective's counters since the iteration began and
the times: quantize (encoding, also inside a look-ahead stream), decode, communicate (the window
from the first launch to the last result, overlapping backward, less quantize and decode), exposed
(what backward waited for: rounds the hook had to wait for, such as a MAX before encoding, and
the time from the last launch to the last result).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from typing import Callable

import torch

from switchagg.codecs._base import Block, Bucket, Codec
from switchagg.errors import ConfigError, JobAborted, SwitchError
from switchagg.methods import make_codec, method_spec
from switchagg.reducer import fill_costs
from switchagg.scaling import budget_for_lanes, clip_bounds
from switchagg.telemetry import StepTelemetry

__all__ = ["HookState"]

log = logging.getLogger(__name__)


def _leave_abandoned(client) -> None:
    """A state's finalizer: its client LEAVEs the job gracefully (without blocking: garbage
    collection may run this in any thread)."""
    client._leave_soon()


class HookState:
    """State of `codec_hook`: one method, one collective, one rank.

    Args:
        method: a name of `switchagg.methods.METHODS`.
        address: the switch's endpoint, e.g. "tcp://127.0.0.1:5555", for methods the switch can
            reduce (ignored by the others); the client joins on the first bucket (every rank
            then). Without it (and without `client`) they run over torch.distributed too.
        client: an open `switchagg.SwitchClient` to use instead (not closed by `close()`).
        collective: a ready `switchagg.collectives.Collective` to use instead of either.
        process_group: torch.distributed group for the methods that need it (default group).
        job: the switch job's name (every rank the same). Default "ddp".
        world_size, rank: default to torch.distributed's (the rank keys the rounding stream).
        config: a `switchagg.ClientConfig` for the lazily opened client.
        timeout: overrides the config's join and op timeouts (seconds).
        token: the switch's (or the job's) token; kept out of checkpoints (`__getstate__`).
        bits: integer budget of each sum, 8, 16 or 32: every worker clips to its share. Default:
            the lane width (32 unless `lane_bits` says otherwise); never wider than the lanes
            (ValueError naming both).
        lane_bits: the switch job's lane width, 8, 16 or 32 bits per value (packets carry k
            lanes: 8-bit lanes send a quarter of int32's payload bytes). Default None: the
            JOIN names none and the switch's default applies (its --lane-bits, 32 unless set);
            joining checks the budget against the width it grants.
        seed: seed of the rounding stream (the same on every rank).
        lr: the learning rate the optimizer uses, or a zero-argument callable returning it (read
            once per iteration; it must agree on every rank).
        options: the method's own hyperparameters (e.g. rounding, beta, eps, lr_rescale).

    Raises:
        ValueError: a bad value or combination; the message starts with the parameter's name.
    """

    __slots__ = (
        # user hyperparameters
        "method", "address", "job", "world_size", "rank", "config", "timeout", "bits", "seed",
        "lr", "options", "process_group", "lane_bits",
        # internal state
        "_client", "_owns_client", "_token", "_collective", "_codec", "_pending_state", "_keys",
        "_lock",
        "_open", "_index", "_offset", "_launched", "_completed", "_failed", "_before", "_times",
        "_streamed", "_model", "_finalizer", "__weakref__",
        # statistics
        "iteration", "buckets", "elements", "error", "last_telemetry",
    )

    def __init__(self, method: str | None, address: str | None = None, *, client=None,
                 collective=None, process_group=None, job: str = "ddp",
                 world_size: int | None = None, rank: int | None = None, config=None,
                 timeout: float | None = None, token: str = "", bits: int | None = None,
                 seed: int = 0, lr: float | Callable[[], float] = 1.0,
                 lane_bits: int | None = None, **options) -> None:
        if method is not None:
            method_spec(method)  # an unknown name fails here, listing the valid ones
        if client is not None and address is not None:
            raise ValueError("address: give the switch's address or an open client, not both")
        if collective is not None:
            world_size, rank = collective.world_size, collective.rank
        elif client is not None:
            address, job = client.address, client.job
            world_size, rank = client.world_size, client.rank
        elif address is not None and (not isinstance(address, str) or "://" not in address):
            raise ValueError(f"address={address!r}: expected a ZeroMQ endpoint such as "
                             f"'tcp://127.0.0.1:5555'")
        if world_size is None and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"world_size={world_size!r}: expected an int >= 1")
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed={seed!r}: expected an int in [0, 2^64)")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
        if not callable(lr) and not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
            raise ValueError(f"lr={lr!r}: expected a positive finite learning rate or a callable "
                             f"returning one")
        joined = collective if collective is not None else client  # already has its lanes
        joined_lanes = getattr(joined, "lane_bits", None)
        if joined_lanes is not None and lane_bits not in (None, joined_lanes):
            raise ValueError(f"lane_bits={lane_bits!r}: the given client's job has "
                             f"{joined_lanes}-bit lanes")
        try:
            bits = budget_for_lanes(bits, lane_bits if joined_lanes is None else joined_lanes)
        except ValueError as exc:
            raise ValueError(f"bits={bits!r}: {exc}") from None
        lane_bits = lane_bits if joined_lanes is None else joined_lanes
        if world_size is not None:
            try:
                clip_bounds(bits, world_size)
            except ValueError as exc:
                raise ValueError(f"bits={bits!r}: {exc}") from None
        self.method, self.address, self.job = method, address, job
        self.world_size, self.rank, self.config, self.timeout = world_size, rank, config, timeout
        self.bits, self.seed, self.lr, self.options = bits, seed, lr, dict(options)
        self.process_group = process_group
        self.lane_bits = lane_bits
        self._client, self._owns_client = client, client is None
        self._finalizer: weakref.finalize | None = None  # LEAVEs if the state is dropped unclosed
        self._token = token
        self._collective = collective
        self._codec: Codec | None = None
        self._model = None
        self._pending_state: dict | None = None
        self._keys: dict[int, int] = {}
        self._lock = threading.Lock()
        self._open = False
        self._index = self._offset = self._launched = self._completed = 0
        self._failed = False
        self._before = None
        self._times = {}
        self._streamed = [0.0]
        self.iteration = self.buckets = self.elements = 0
        self.error: BaseException | None = None
        self.last_telemetry: StepTelemetry | None = None
        if method is not None and world_size is not None and rank is not None:
            self._build_codec(world_size, rank)  # bad options fail now, not on the first bucket
        log.info("HookState: method %s, switch %s job %r, world size %s, rank %s, %d-bit budget, "
                 "lanes %s, seed %d, lr %s, options %s", method, address, job, world_size, rank,
                 bits, lane_bits or "the switch's", seed, "callable" if callable(lr) else lr,
                 self.options)

    # ---- public ----------------------------------------------------------------------------

    @property
    def codec(self) -> Codec | None:
        """This rank's codec (None until the first bucket when the rank comes from the switch)."""
        return self._codec

    @property
    def alpha(self):
        """IntSGD's alpha of the latest iteration (one per block); None on heuristic steps and
        for methods without one."""
        return getattr(self._codec, "last_alpha", None)

    @property
    def client(self):
        """The SwitchClient (opened on first access), for methods that run on the switch.

        Raises:
            SwitchTimeout / JoinRejected: from joining (the message names the address).
        """
        with self._lock:
            if self._client is None:
                if self.error is not None:
                    raise self.error
                if self.address is None:
                    raise ConfigError("address: this state has no switch address", field="address")
                from switchagg.client import SwitchClient
                try:
                    self._client = SwitchClient(self.address, self.job, self._world(), self.rank,
                                                config=self.config, timeout=self.timeout,
                                                token=self._token, lane_bits=self.lane_bits)
                except SwitchError as exc:
                    self.error = exc
                    raise
                if self.bits > self._client.lane_bits:  # the switch's default lanes are narrower
                    client, self._client = self._client, None
                    client.close(reason="budget wider than the job's lanes")
                    self.error = ConfigError(
                        f"bits={self.bits}: the switch gave job {self.job!r} "
                        f"{client.lane_bits}-bit lanes (its --lane-bits); a {self.bits}-bit "
                        f"budget would wrap them: pass bits <= {client.lane_bits} or "
                        f"lane_bits={self.bits}", field="bits", value=self.bits)
                    raise self.error
                # A state dropped without close() (its DDP model deleted) still LEAVEs, so its
                # job ends with it; at interpreter exit switchagg.client closes every client.
                self._finalizer = weakref.finalize(self, _leave_abandoned, self._client)
                self._finalizer.atexit = False
                self.world_size, self.rank = self._client.world_size, self._client.rank
            return self._client

    def attach(self, model) -> None:
        """Give the codec the model, for methods that read activations (ISGQ's `attach`); a
        no-op for the others. Call it before the first forward; kept across codec rebuilds."""
        self._model = model
        attach = getattr(self._codec, "attach", None)
        if attach is not None:
            attach(model)

    def step_telemetry(self) -> StepTelemetry | None:
        """Close the iteration that just ran (call after backward) and return its telemetry."""
        with self._lock:
            self._finish()
            return self.last_telemetry

    def close(self, reason: str = "") -> None:
        """Leave the switch job (a non-empty reason aborts it for every rank)."""
        with self._lock:
            client, self._client = self._client, None
            collective, self._collective = self._collective, None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if client is not None and self._owns_client:
            client.close(reason=reason)
        elif collective is not None and client is None and getattr(collective, "kind", "") != "switch":
            collective.close()
        if reason and self.error is None:
            self.error = JobAborted(f"this rank left job {self.job!r}: {reason}", job=self.job)

    def __getstate__(self) -> dict:
        """Everything but the client, collective, lock and iteration bookkeeping (a checkpoint)."""
        lr = self._lr_now() if callable(self.lr) else self.lr
        with self._lock:
            self._finish()
        state = {name: getattr(self, name) for name in HookState.__slots__
                 if not name.startswith("_") and name not in ("error", "last_telemetry")}
        if callable(self.lr):
            log.warning("HookState pickled with lr=%.6g, the current value of its lr callable; "
                        "set state.lr again after loading to follow the schedule", lr)
            state["lr"] = lr
        state["process_group"] = None
        state["codec_state"] = None if self._codec is None else self._codec.state_dict()
        return state

    def __setstate__(self, state: dict) -> None:
        codec_state = state.pop("codec_state")
        for name in HookState.__slots__:
            if not name.startswith("_"):
                setattr(self, name, state.get(name))
        self.error, self.last_telemetry = None, None
        self._client, self._owns_client, self._collective = None, True, None
        self._finalizer = None
        self._token = ""    # never in a checkpoint: set state._token again after loading
        self._codec, self._pending_state, self._keys = None, codec_state, {}
        self._model = None
        self._lock = threading.Lock()
        self._open, self._failed = False, False
        self._index = self._offset = self._launched = self._completed = 0
        self._before, self._times, self._streamed = None, {}, [0.0]
        if self.world_size is not None and self.rank is not None and self.method is not None:
            self._build_codec(self.world_size, self.rank)

    # ---- used by the hook --------------------------------------------------------------------

    def _world(self) -> int:
        if self.world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("world_size: pass it, or initialize torch.distributed first")
            self.world_size = torch.distributed.get_world_size(self.process_group)
            self.rank = torch.distributed.get_rank(self.process_group)
        return self.world_size

    def _build_codec(self, world_size: int, rank: int, k: int | None = None) -> None:
        if k is None:
            k = self.config.k if self.config is not None else 64
        self._codec = make_codec(self.method, world_size=world_size, rank=rank, seed=self.seed,
                                 bits=self.bits, k=k, **self.options)
        if self._pending_state is not None:
            self._codec.load_state_dict(self._pending_state)
            self._pending_state = None
        model = getattr(self, "_model", None)
        if model is not None and hasattr(self._codec, "attach"):
            self._codec.attach(model)

    def _ready(self):
        """(collective, codec), built on the first bucket. Raises SwitchError or ValueError."""
        if self._collective is None:
            if self.error is not None:
                raise self.error
            if method_spec(self.method).collective_kind == "int" and \
                    (self.address is not None or self._client is not None):
                from switchagg.collectives.switch import SwitchCollective
                collective = SwitchCollective(self.client, owns_client=False)
            else:
                from switchagg.collectives.torchdist import TorchCollective
                self._world()
                collective = TorchCollective(self.process_group)
            with self._lock:
                self._collective = collective
        collective = self._collective
        codec = self._codec
        if codec is None or (codec.n, codec.rank, codec.k) != (collective.world_size,
                                                               collective.rank, collective.k):
            state = None if codec is None else codec.state_dict()
            if state is not None and self._pending_state is None:
                self._pending_state = state
            self._build_codec(collective.world_size, collective.rank, collective.k)
            self.world_size, self.rank = collective.world_size, collective.rank
        return collective, self._codec

    def _lr_now(self) -> float:
        lr = float(self.lr() if callable(self.lr) else self.lr)
        if not 0 < lr < math.inf:
            raise ValueError(f"lr={lr!r}: the learning rate must be positive and finite")
        return lr

    def _bucket(self, bucket, codec: Codec, collective) -> Bucket:
        """This DDP bucket's place in the iteration, beginning the iteration on its first one."""
        buf = bucket.buffer()
        with self._lock:
            if not self._open:
                self._finish()
                codec.begin(self.iteration, self._lr_now())
                self._open, self._failed = True, False
                self._index = self._offset = self._launched = self._completed = 0
                self._before = collective.stats.snapshot()
                self._times = {"quantize": 0.0, "decode": 0.0, "blocked": 0.0, "first": None,
                               "last": None, "done": None}
                self._streamed = [0.0]
            blocks, a = [], 0
            keyer = getattr(codec, "param_key", None)   # a codec attached to the model
            for param in bucket.parameters():
                key = keyer(param) if keyer is not None else None
                if key is None:
                    key = self._keys.setdefault(id(param), len(self._keys))
                blocks.append(Block(key, a, a + param.numel(), tuple(param.shape)))
                a += param.numel()
            if a != buf.numel():
                raise RuntimeError(f"DDP bucket {bucket.index()}: its parameters cover {a} of "
                                   f"{buf.numel()} elements; cannot place per-parameter state")
            placed = Bucket(self._index, self._offset, buf.numel(), tuple(blocks))
            self._index += 1
            self._offset += buf.numel()
            self.buckets += 1
            self.elements += buf.numel()
            return placed

    def _launched_one(self, t_start: float, t_encoded: float, t_end: float,
                      is_last: bool) -> None:
        with self._lock:
            self._launched += 1
            self._times["quantize"] += t_encoded - t_start
            self._times["blocked"] += t_end - t_encoded   # a Max round, or the hand-off
            if self._times["first"] is None:
                self._times["first"] = t_start
            self._times["last"] = t_end
            if is_last:
                self.iteration += 1
                self._open = False

    def _completed_one(self, decode_s: float, failed: bool) -> None:
        with self._lock:
            self._completed += 1
            self._failed |= failed
            self._times["decode"] += decode_s
            self._times["done"] = time.perf_counter()

    def _finish(self) -> None:
        """Fold the last iteration into the codec and its telemetry (caller holds the lock)."""
        codec = self._codec
        if codec is None or self._before is None or self._open:
            return
        if self._failed or self._completed < self._launched:
            self._before = None    # a failed or abandoned iteration: the job is broken anyway
            return
        codec.end()
        tel, times = codec.tel, self._times
        tel.numel = self._offset
        tel.t_quantize = times["quantize"] + self._streamed[0]
        tel.t_decode = times["decode"]
        if times["first"] is not None and times["done"] is not None:
            tel.t_communicate = max(times["done"] - times["first"] - tel.t_quantize
                                    - tel.t_decode, 0.0)
            tel.t_exposed = max(times["done"] - times["last"], 0.0) + times["blocked"]
        fill_costs(tel, self._collective.stats.since(self._before), buckets=self._launched)
        self.last_telemetry = tel
        self._before = None
