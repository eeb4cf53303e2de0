"""One worker's training loop: a DDP model whose communication hook is the method's codec.

What it owns: running one method on one task for one worker, from a fresh model to a summary, and
the per-step and per-evaluation records (JSON-able dicts) that the comparison plots and tables are
made from. What it must never do: communicate except through the DDP hook (the method's codec and
collective live in the `switchagg.ddp.HookState` it is given), or make anything depend on
wall-clock time except the timings it reports.

How it works, per step (the walk of one gradient, seen from the worker):
  1. forward/backward of the local batch through `DistributedDataParallel`; as each gradient
     bucket fills, DDP calls the hook, which encodes it with the codec, launches its reduction
     (the switch, or torch.distributed) and decodes the average back into the bucket, overlapping
     the rest of backward. backward() returns once every bucket is averaged.
  2. `state.step_telemetry()`: the integer range, clipping, wraps, bytes, packets, rounds and
     the quantize / communicate / decode / exposed split of this step.
  3. the task's gradient clip (on the averaged gradient, as DDP scripts do) and the optimizer
     step (momentum and weight decay after the reduce, the SGD/PowerSGD baselines' placement).
With `preset.momentum_before_reduce` (the IntSGD authors' ResNet script), the method's hook is
wrapped by `before_reduce_hook`: as each bucket fills, every worker adds weight decay to its own
gradients and folds them into its own momentum buffers (per parameter, in the bucket's gradient
views), so what the codec compresses is the locally momentum-corrected, weight-decayed vector; the
optimizer then takes a plain SGD step (no momentum, no decay) with the average. For an exact
average (sgd) the two placements give the same steps: momentum is linear.
Every worker applies the same averaged gradient to the same initial weights, so replicas stay equal;
the summary carries a digest of the parameters so a caller can check that they did. compute time
is forward + backward less what the hook spent encoding and decoding and less the communication
backward waited for after its last bucket (`t_exposed`).

Reproducibility: one seed fixes everything that is random. The initial weights come from
`derive_seed(seed, "init")` (the same on every rank), dropout from `(seed, "dropout", rank)`, the data
order of each epoch from `(seed, "data", rank, epoch)`, and the method's rounding from the state's
seed. Same seed, same numbers (timings aside).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from switchagg.workers.data import derive_seed, generator_for
from switchagg.workers.tasks.base import Task

__all__ = ["TrainConfig", "train", "telemetry_dict", "params_digest", "before_reduce_hook"]

#: Serializes seeding + building should several workers share a process (threads); dropout still
#: draws from the global generator, so threaded runs are reproducible only without dropout.
_INIT_LOCK = threading.Lock()

#: Called with each record (a JSON-able dict): kind "step" (every worker) or "eval" (rank 0).
Sink = Callable[[dict[str, Any]], None]
#: Called on rank 0 after each step with (steps done, total steps, last loss).
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """What to run; None takes the task's preset.

    Attributes:
        epochs: passes over each shard.
        batch_size: examples per worker per step (0: the whole shard).
        lr: initial learning rate (the task's schedule scales it).
        max_steps: stop after this many steps (for quick runs and tests).
        eval_every: evaluate every this many epochs (always after the last step).
        seed: the one seed (see the module notes).
    """

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Check every field that is set; returns self.

        Raises:
            ConfigError: naming the field and its value (a ValueError).
        """
        from switchagg.errors import ConfigError

        def bad(name: str, why: str) -> ConfigError:
            value = getattr(self, name)
            return ConfigError(f"TrainConfig.{name}={value!r}: {why}", field=name, value=value)

        for name, low, why in (("epochs", 1, "expected a whole number of epochs >= 1"),
                               ("batch_size", 0, "expected examples per worker >= 0 (0: the whole shard)"),
                               ("max_steps", 1, "expected a number of steps >= 1"),
                               ("eval_every", 1, "expected a number of epochs >= 1"),
                               ("seed", 0, "expected a non-negative integer")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < low):
                raise bad(name, why)
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr)
                                    or self.lr <= 0):
            raise bad("lr", "expected a positive, finite learning rate")
        return self


def telemetry_dict(telemetry: Any) -> dict[str, Any]:
    """A method's StepTelemetry (dataclass or object with `as_dict`) as a plain dict."""
    if hasattr(telemetry, "as_dict"):
        return dict(telemetry.as_dict())
    if isinstance(telemetry, dict):
        return dict(telemetry)
    return dict(vars(telemetry))


def params_digest(model: torch.nn.Module) -> str:
    """A short hash of the trainable parameters' bytes (equal replicas have equal digests)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without this the compute time would leak into the reduce's.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ModelView:
    """The DDP wrapper for calls (forward goes through DDP, which readies its hooks), the module
    for attributes (a task's loss may read `model.weight` or call `model.init_hidden`)."""

    def __init__(self, ddp: torch.nn.Module) -> None:
        self._ddp = ddp

    def __call__(self, *args, **kwargs):
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._ddp.module, name)


def _is_non_finite(exc: BaseException, state: Any) -> str | None:
    """The NonFiniteGradient message behind a failed backward (DDP wraps hook errors), if any."""
    error = getattr(state, "error", None)
    if type(error).__name__ == "NonFiniteGradient":
        return str(error)
    if "NonFiniteGradient" in f"{type(exc).__name__}: {exc}":
        return str(exc)
    return None


def train(task: Task, state: Any, *, rank: int, world_size: int, config: TrainConfig,
          sink: Sink | None = None, progress: Progress | None = None,
          process_group: Any = None, bucket_cap_mb: float | None = None) -> dict[str, Any]:
    """Train a fresh model of `task` through DDP with `state`'s method; every rank calls this together.

    Args:
        task: the task (this worker's own instance).
        state: a `switchagg.ddp.HookState` (from `hook_for`) for this rank; `state.method` names
            the records.
        rank, world_size: this worker and the group size (the data shard's).
        config: epochs, batch size, lr, seed (None fields take the task's preset).
        sink: receives every step and evaluation record.
        progress: rank 0's progress callback.
        process_group: the group DDP uses for its own bookkeeping (default: the default group).
        bucket_cap_mb: DDP's bucket size (default DDP's 25 MB).

    Returns:
        A summary dict: steps, wall_s, the last evaluation (rank 0; empty elsewhere), training loss,
        cumulative wire cost, integer extremes and time split (see `_Totals.summary`).

    Raises:
        Whatever the reduction raises (SwitchError subclasses from the transport, as DDP's
        RuntimeError), except a non-finite gradient, which ends the run as diverged.
    """
    from switchagg.ddp import codec_hook
    preset = task.preset
    epochs = config.epochs if config.epochs is not None else preset.epochs
    batch_size = config.batch_size if config.batch_size is not None else preset.batch_size
    base_lr = config.lr if config.lr is not None else preset.lr
    eval_every = max(1, config.eval_every or preset.eval_every)
    name = state.method

    with _INIT_LOCK:  # torch's global generator: threads take turns
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = task.build_model()
        model.train()
        torch.manual_seed(derive_seed(config.seed, "dropout", rank))
    params = [p for p in model.parameters() if p.requires_grad]
    device_ids = [task.device.index or 0] if task.device.type == "cuda" else None
    extra = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=process_group,
                                  **extra)
    if hasattr(state, "attach"):
        state.attach(model)   # methods that read activations (ISGQ) hook the model's layers
    groups = task.param_groups(model, preset.weight_decay)
    if preset.momentum_before_reduce:
        ddp.register_comm_hook(state, before_reduce_hook(codec_hook, groups, preset.momentum,
                                                         preset.nesterov))
        groups = [{**g, "weight_decay": 0.0} for g in groups]
        momentum = 0.0
    else:
        ddp.register_comm_hook(state, codec_hook)
        momentum = preset.momentum
    view = _ModelView(ddp)
    optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=momentum,
                                nesterov=preset.nesterov and momentum > 0)
    shard = task.shard(rank, world_size, batch_size)
    per_epoch = shard.steps_per_epoch
    total = epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    totals = _Totals()
    emit = sink or (lambda record: None)
    last_eval: dict[str, float] = {}
    diverged: str | None = None
    step = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        if step >= total:
            break
        carry = None
        epoch_losses: list[float] = []
        for batch in shard.batches(epoch, generator_for(config.seed, "data", rank, epoch)):
            if step >= total:
                break
            lr = preset.lr_at(epoch + (step - epoch * per_epoch) / per_epoch, base_lr,
                              world_size)
            for group in optimizer.param_groups:
                group["lr"] = lr
            state.lr = lr
            t0 = time.perf_counter()
            # 1. forward/backward through DDP: the hook reduces each bucket as it fills
            optimizer.zero_grad(set_to_none=False)
            loss, carry = task.loss(view, batch, carry)
            try:
                loss.backward()
            except Exception as exc:
                # A NaN/Inf gradient (the hook refuses it before sending anything). When the
                # weights themselves blew up every replica sees it at the same step, so all ranks
                # stop together; the run is reported as diverged rather than as a crash.
                diverged = _is_non_finite(exc, state)
                if diverged is None:
                    raise
                break
            _sync(task.device)
            t1 = time.perf_counter()
            # 2. what the reduction cost
            tel = telemetry_dict(state.step_telemetry())
            # 3. the task's clip on the averaged gradient, then the optimizer
            if preset.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, preset.grad_clip)
            optimizer.step()
            _sync(task.device)
            t2 = time.perf_counter()

            loss_value = float(loss.detach())
            epoch_losses.append(loss_value)
            hook_s = tel.get("t_quantize", 0.0) + tel.get("t_decode", 0.0) + tel.get("t_exposed", 0.0)
            t_compute = max(t1 - t0 - hook_s, 0.0)
            totals.add(tel, t_compute, t1 - t0, t2 - t1)
            record = {"kind": "step", "method": name, "rank": rank, "step": step, "epoch": epoch,
                      "loss": loss_value, "lr": lr, "t_compute": t_compute,
                      "t_backward": t1 - t0, "t_update": t2 - t1,
                      "bytes_sent_cum": totals.bytes_sent}
            record.update({k: v for k, v in tel.items() if k not in ("method", "step")})
            emit(record)
            step += 1
            if progress is not None and rank == 0:
                progress(step, total, loss_value)

        finished = step >= total or epoch == epochs - 1 or diverged is not None
        totals.last_epoch_loss = sum(epoch_losses) / max(1, len(epoch_losses))
        if rank == 0 and ((epoch + 1) % eval_every == 0 or finished):
            last_eval = task.evaluate(model)
            emit({"kind": "eval", "method": name, "rank": rank, "step": step, "epoch": epoch + 1,
                  "bytes_sent_cum": totals.bytes_sent, **last_eval})
        if diverged is not None:
            break
    wall = time.perf_counter() - start
    summary = totals.summary(name=name, rank=rank, steps=step, wall_s=wall, evaluation=last_eval,
                             digest=params_digest(model))
    summary["diverged"] = diverged
    return summary


def before_reduce_hook(inner: Callable, groups: list[dict[str, Any]], momentum: float,
                       nesterov: bool) -> Callable:
    """`inner` (a DDP hook), after this worker's weight decay and momentum on each bucket.

    Per parameter p of the bucket, on its gradient view g (in place, so the codec sees it):
    g += wd_p p; buf_p = momentum buf_p + g (buf_p = g the first time); g = g + momentum buf_p
    (Nesterov) or buf_p, as torch.optim.SGD would after the reduce.
    """
    decay = {id(p): float(g["weight_decay"]) for g in groups for p in g["params"]}
    buffers: dict[int, torch.Tensor] = {}

    def hook(state, bucket):
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            wd = decay.get(id(p), 0.0)
            if wd:
                grad.add_(p.detach(), alpha=wd)
            if momentum:
                buf = buffers.get(id(p))
                if buf is None:
                    buf = buffers[id(p)] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad)
                if nesterov:
                    grad.add_(buf, alpha=momentum)
                else:
                    grad.copy_(buf)
        return inner(state, bucket)

    return hook


class _Totals:
    """Running sums and extremes of the per-step records of one run."""

    def __init__(self) -> None:
        self.steps = 0
        self.bytes_sent = self.bytes_received = self.packets = self.rounds = self.wraps = 0
        self.clipped = self.numel = self.paper_bits = 0
        self.max_abs_sum = self.max_abs_q = self.sum_bits = 0
        # The same extremes without step 0: IntSGD takes its first step with SwitchML's exponent
        # scaling by default (r is unknown before it), which uses the whole int32 range once and
        # would hide the integer range of its steady state. max |Q_i| is what one worker's b-bit
        # packet must hold; max |sum| what the switch's adders must.
        self.later_max_abs_sum = self.later_max_abs_q = self.later_sum_bits = 0
        self.t = {"compute": 0.0, "quantize": 0.0, "communicate": 0.0, "decode": 0.0,
                  "exposed": 0.0, "backward": 0.0, "update": 0.0}
        self.last_epoch_loss = math.nan

    def add(self, tel: dict[str, Any], t_compute: float, t_backward: float, t_update: float) -> None:
        self.steps += 1
        self.bytes_sent += int(tel.get("bytes_sent", 0))
        self.bytes_received += int(tel.get("bytes_received", 0))
        self.packets += int(tel.get("packets_sent", 0))
        self.rounds += int(tel.get("rounds", 0))
        self.wraps += int(tel.get("wraps", 0))
        self.clipped += int(tel.get("clipped", 0))
        self.numel += int(tel.get("numel", 0))
        self.paper_bits += int(tel.get("paper_bits", 0))
        self.max_abs_sum = max(self.max_abs_sum, int(tel.get("max_abs_sum", 0)))
        self.max_abs_q = max(self.max_abs_q, int(tel.get("max_abs_q", 0)))
        self.sum_bits = max(self.sum_bits, int(tel.get("sum_bits", 0)))
        if self.steps > 1:
            self.later_max_abs_sum = max(self.later_max_abs_sum, int(tel.get("max_abs_sum", 0)))
            self.later_max_abs_q = max(self.later_max_abs_q, int(tel.get("max_abs_q", 0)))
            self.later_sum_bits = max(self.later_sum_bits, int(tel.get("sum_bits", 0)))
        for key in ("quantize", "communicate", "decode", "exposed"):
            self.t[key] += float(tel.get(f"t_{key}", 0.0))
        self.t["compute"] += t_compute
        self.t["backward"] += t_backward
        self.t["update"] += t_update

    def summary(self, *, name: str, rank: int, steps: int, wall_s: float,
                evaluation: dict[str, float], digest: str) -> dict[str, Any]:
        n = max(1, self.steps)
        return {
            "method": name, "rank": rank, "steps": steps, "wall_s": wall_s,
            "evaluation": evaluation, "final_train_loss": self.last_epoch_loss,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "packets": self.packets, "rounds_per_step": self.rounds / n, "wraps": self.wraps,
            "numel": self.numel, "paper_bits": self.paper_bits,
            "clip_fraction": self.clipped / self.numel if self.numel else 0.0,
            "max_abs_sum": self.max_abs_sum, "max_abs_q": self.max_abs_q,
            "bits_needed": self.sum_bits,
            "max_abs_sum_after_first_step": self.later_max_abs_sum,
            "max_abs_q_after_first_step": self.later_max_abs_q,
            "bits_needed_after_first_step": self.later_sum_bits,
            "time_per_step": {k: v / n for k, v in self.t.items()},
            "params_digest": digest,
        }
