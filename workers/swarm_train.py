"""SwarmSGD's training loop: H local steps, then one pairwise average with a random neighbour.

What it owns: running `swarmsgd` on one task for one worker, from a fresh model to a summary in
workers/train.py's format (so workers/report.py tables it beside the other methods): the local
steps, the interactions (through `switchagg.swarm.node.SwarmNode`), the rendezvous that tells each
worker its peers' addresses, and the end of the run, where rank 0 gathers every final model to
evaluate their average and the worst of them. What it must never do: use a collective (SwarmSGD
has no all-reduce and no global round), or wait without a bound.

How it works:
- Options come from `--opt KEY=VALUE` (see `SwarmConfig`); `split_options` takes them out of the
  task's options.
- Rendezvous: the same one that assigns ranks. Under torch.distributed (torchrun, or `compare`
  with `sgd` in the run) its store; otherwise a TCPStore at MASTER_ADDR:MASTER_PORT, hosted by
  rank 0. Each worker binds its peer socket on the address it reaches MASTER_ADDR from
  (127.0.0.1 on one machine; `--opt swarm_host=IP` overrides), publishes it, and reads everyone's.
  That is the only moment every worker waits for all the others, besides the end.
- Steps: the same model init, data order, lr schedule and optimizer as workers/train.py (one seed
  fixes them: see its notes), except that each worker applies its own gradient to its own model.
  A step holds the node's model lock, so a peer's averaging lands between two steps, never inside
  one. Every H steps the worker starts one interaction and goes on with its local steps; the
  peer's answer is applied after the step during which it arrived, keeping the steps taken
  meanwhile (x <- x + (y^ - snapshot)/2: the non-blocking variant). At most one interaction is
  under way: a turn that comes while the last is still going is taken at the first step
  boundary after it ended, so a worker never waits for a peer, and a slow network means fewer
  interactions, not idle time. A turn the peer declined (it finished, or could not take the
  request in time) averaged nothing, so it is taken again at once, with a peer drawn again.
  `--opt blocking=True` waits for each answer instead (bounded by `exchange_timeout`).
  Meanwhile its answering thread serves peers' requests.
- Epochs are total passes over the data by all workers: each worker takes one pass over its own
  shard per epoch, so E epochs are as many gradient steps per worker as synchronous SGD's.
- Time: compute (forward, backward; the optimizer step apart, as in workers/train.py) against sync (in its own interactions: encoding,
  sending, decoding, applying, waiting where it has to, plus waiting for a peer's averaging
  to release the model before a step);
  the sync fraction, sync / wall, is the paper's headline number. Serving peers runs beside the
  training thread and is reported apart (t_serve).
- The end: a worker that took its last step goes on answering its peers' requests until every
  worker has (bounded by the timeout), so a worker that fell behind does not train its last
  steps alone; then it declines further exchanges, posts its final model to the store and
  waits for rank 0, which evaluates every node's model and their average and reports the
  average's numbers as the run's evaluation, the worst node's beside it, and the spread (mean
  L2 distance of the models to their average).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from switchagg.workers.data import derive_seed, generator_for
from switchagg.workers.tasks.base import Task
from switchagg.workers.train import _INIT_LOCK, TrainConfig, _sync, params_digest

__all__ = [
    "SWARM_OPTIONS",
    "SwarmConfig",
    "local_host",
    "rendezvous_store",
    "run_swarm",
    "split_options",
    "train_swarm",
]

log = logging.getLogger("switchagg.swarm")

#: The interpreter's thread switch interval during a run (default 5 ms): a peer's request waits
#: for the answering thread to get the GIL from the training thread, and at 5 ms a turn that wait,
#: not the network, would be most of an interaction's time on a small model.
SWITCH_INTERVAL_S = 2e-4

#: `--opt` keys SwarmSGD reads (and the task never sees), with their defaults.
SWARM_OPTIONS: dict[str, Any] = {
    "local_steps": 2, "quant": "lattice", "quant_bits": 8, "margin": 4.0, "graph": "complete",
    "degree": None, "exchange_timeout": 5.0, "dead_after": 3, "swarm_host": None,
    "blocking": False,
}


@dataclass(frozen=True)
class SwarmConfig:
    """SwarmSGD's hyperparameters (`--opt KEY=VALUE`).

    Attributes:
        local_steps: H, local SGD steps between two interactions (default 2: the paper's setup
            used small H, about 2 to 4; not verified against its text).
        quant: "lattice" (models as b-bit lattice codes) or "none" (full float32 copies).
        quant_bits: lattice bits per coordinate: 4, 8 or 16.
        margin: lattice radius as a multiple of the last distance seen between two models.
        graph: "complete", "ring" or "regular" (random, `degree` neighbours each).
        degree: the random regular graph's degree.
        exchange_timeout: seconds an interaction may wait for its peer.
        dead_after: timeouts in a row after which a peer is skipped.
        swarm_host: the address to bind and advertise (default: the one MASTER_ADDR is reached
            from).
        blocking: wait for each interaction's answer before the next local step (default: go on
            computing and apply the answer when it comes, the paper's non-blocking variant).
    """

    local_steps: int = 2
    quant: str = "lattice"
    quant_bits: int = 8
    margin: float = 4.0
    graph: str = "complete"
    degree: int | None = None
    exchange_timeout: float = 5.0
    dead_after: int = 3
    swarm_host: str | None = None
    blocking: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SwarmConfig:
        """Raises ValueError naming a bad option."""
        unknown = sorted(set(options) - set(SWARM_OPTIONS))
        if unknown:
            raise ValueError(f"swarmsgd has no option(s) {unknown}; valid: {sorted(SWARM_OPTIONS)}")
        config = cls(**options)
        if not isinstance(config.local_steps, int) or config.local_steps < 1:
            raise ValueError(f"local_steps={config.local_steps!r} must be an integer >= 1")
        config.node_config().validate()
        return config

    def node_config(self):
        from switchagg.swarm.node import NodeConfig
        return NodeConfig(quant=self.quant, bits=self.quant_bits, margin=float(self.margin),
                          timeout=float(self.exchange_timeout), dead_after=int(self.dead_after))


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the task's options, SwarmSGD's) out of the parsed `--opt` pairs."""
    task = {k: v for k, v in options.items() if k not in SWARM_OPTIONS}
    swarm = {k: v for k, v in options.items() if k in SWARM_OPTIONS}
    return task, swarm


def local_host(master_addr: str) -> str:
    """The local address from which `master_addr` is reached (loopback stays loopback)."""
    try:
        infos = socket.getaddrinfo(master_addr, None, socket.AF_INET)
        target = infos[0][4][0]
    except OSError:
        return "127.0.0.1"
    if target.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))    # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def rendezvous_store(master_addr: str | None, master_port: int | None, rank: int, world_size: int,
                     timeout: float):
    """(store, owned): torch.distributed's store if initialized, else a TCPStore of our own."""
    import torch.distributed as dist
    if dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store(), False
    if not master_addr or not master_port:
        raise ValueError("swarmsgd finds its peers through the rendezvous: pass --master-addr and "
                         "--master-port (or set MASTER_ADDR and MASTER_PORT)")
    store = dist.TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    return store, True


def _wait_keys(store, keys: list[str], deadline: float) -> list[str]:
    """The keys still missing at the deadline.

    Waits on the store, which wakes every waiter the moment the last key is set, so the workers
    leave the rendezvous within about a millisecond of each other. (A poll every 50 ms started
    them up to 50 ms apart, which is the whole of a short run: the last one to start found its
    peers finished and averaged with none of them.)
    """
    remaining = deadline - time.monotonic()
    if remaining > 0:
        # At least 1 ms: a zero timeout means "no timeout" to the store.
        wait = datetime.timedelta(milliseconds=max(1, math.ceil(remaining * 1e3)))
        try:
            store.wait(list(keys), wait)
        except RuntimeError:   # DistStoreError: the deadline came first; say which are missing
            pass
    return [k for k in keys if not store.check([k])]


class _FlatModel:
    """A model's trainable parameters as one flat float64 vector (read) and in-place add."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)

    def read(self) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params]).double().cpu().numpy()

    def add(self, delta: np.ndarray) -> None:
        flat = torch.from_numpy(np.ascontiguousarray(delta))
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.add_(flat[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype))
                offset += n

    def write(self, vec: np.ndarray) -> None:
        self.add(np.asarray(vec, dtype=np.float64) - self.read())


def train_swarm(task: Task, *, rank: int, world_size: int, config: TrainConfig, swarm: SwarmConfig,
                store, job: str, host: str = "127.0.0.1", timeout: float = 120.0,
                sink=None, progress=None, name: str = "swarmsgd") -> dict[str, Any]:
    """Train a fresh model of `task` with SwarmSGD as worker `rank`; every rank calls this.

    Args:
        task: the task (this worker's own instance).
        rank, world_size: this worker and the number of workers.
        config: epochs, batch size, lr, seed (None fields take the task's preset).
        swarm: SwarmSGD's hyperparameters.
        store: the rendezvous store (a torch.distributed Store) every worker shares.
        job: names this run in the store and on the wire.
        host: where to bind the peer socket (and the address peers get).
        timeout: bound on the rendezvous and on the end-of-run gathering.
        sink: receives every step and evaluation record; progress: rank 0's progress callback.

    Returns:
        A workers/train.py summary, plus `decentralized`, `sync_fraction`, `interactions`,
        `examples_seen`, `shard_size` and `swarm` (config and the node's counters); rank 0's
        also has `worst_node`, `node_evaluations`, `model_spread` and `missing_ranks`.

    Raises:
        SwitchTimeout: peers' addresses did not all arrive within `timeout`.
    """
    from switchagg.errors import SwitchTimeout
    from switchagg.swarm.graph import neighbours
    from switchagg.swarm.node import SwarmNode

    preset = task.preset
    epochs = config.epochs if config.epochs is not None else preset.epochs
    batch_size = config.batch_size if config.batch_size is not None else preset.batch_size
    base_lr = config.lr if config.lr is not None else preset.lr
    eval_every = max(1, config.eval_every or preset.eval_every)
    emit = sink or (lambda record: None)

    with _INIT_LOCK:
        torch.manual_seed(derive_seed(config.seed, "init"))
        model = task.build_model()
        model.train()
        torch.manual_seed(derive_seed(config.seed, "dropout", rank))
    params = [p for p in model.parameters() if p.requires_grad]
    flat = _FlatModel(params)
    optimizer = torch.optim.SGD(task.param_groups(model, preset.weight_decay), lr=base_lr,
                                momentum=preset.momentum, nesterov=preset.nesterov and preset.momentum > 0)
    shard = task.shard(rank, world_size, batch_size)
    per_epoch = shard.steps_per_epoch
    total = epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    nbrs = neighbours(swarm.graph, world_size, degree=swarm.degree, seed=derive_seed(config.seed, "graph"))
    node = SwarmNode(rank, world_size, nbrs[rank], flat.read, flat.add, numel=flat.numel, job=job,
                     config=swarm.node_config(), seed=derive_seed(config.seed, "swarm", rank), host=host)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        # Answer before publishing the address: a peer that has it, and starts first, is served at
        # once rather than left waiting (with its one interaction under way) for our start.
        node.start()
        store.set(f"{job}/addr/{rank}", node.address)
        keys = [f"{job}/addr/{r}" for r in range(world_size)]
        missing = _wait_keys(store, keys, time.monotonic() + timeout)
        if missing:
            raise SwitchTimeout(f"swarmsgd: no address from rank(s) {[k.rsplit('/', 1)[1] for k in missing]} "
                                f"within {timeout:.0f} s; are all {world_size} workers running?",
                                job=job, rank=rank)
        node.connect([store.get(k).decode() for k in keys])
        log.info("rank %d: swarm node at %s, neighbours %s, H=%d, quant=%s", rank, node.address,
                 list(nbrs[rank]), swarm.local_steps, swarm.quant)

        t_compute = t_update = t_sync = 0.0
        step = 0
        since = 0
        diverged = None
        last_epoch_loss = math.nan
        outcomes: dict[str, int] = {}
        start = time.perf_counter()
        for epoch in range(epochs):
            if step >= total:
                break
            carry = None
            losses: list[float] = []
            for batch in shard.batches(epoch, generator_for(config.seed, "data", rank, epoch)):
                if step >= total:
                    break
                lr = preset.lr_at(epoch + (step - epoch * per_epoch) / per_epoch, base_lr)
                t_lock = time.perf_counter()
                with node.step_lock():   # peers' averaging waits for the end of this step
                    t0 = time.perf_counter()   # waiting here for a peer's averaging is sync time
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.zero_grad(set_to_none=False)
                    loss, carry = task.loss(model, batch, carry)
                    loss.backward()
                    if preset.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, preset.grad_clip)
                    _sync(task.device)
                    t_mid = time.perf_counter()
                    optimizer.step()
                    _sync(task.device)
                t1 = time.perf_counter()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    diverged = f"rank {rank}: non-finite loss {loss_value} at step {step}"
                    break
                since += 1
                ended = []
                if node.pending:   # an answer that arrived during the step is applied now
                    ended.append(node.poll(0.0))
                # One interaction at a time: while the last is still under way, this turn waits
                # for the first step boundary after it ended; the local steps go on meanwhile.
                # A declined turn averaged with no one: it is taken again at once (blocking: at
                # the next boundary), with a peer drawn again (a finished one never is).
                if ended and ended[-1] == "declined":
                    since = max(since, swarm.local_steps)
                if since >= swarm.local_steps and not node.pending:
                    since = 0
                    ended.append(node.interact() if swarm.blocking else node.begin())
                    if ended[-1] == "declined":
                        since = swarm.local_steps
                outcome = next((o for o in reversed(ended) if o is not None), None)
                for o in ended:
                    if o is not None:
                        outcomes[o] = outcomes.get(o, 0) + 1
                t2 = time.perf_counter()
                t_compute += t_mid - t0
                t_update += t1 - t_mid
                t_sync += (t2 - t1) + (t0 - t_lock)
                losses.append(loss_value)
                emit({"kind": "step", "method": name, "rank": rank, "step": step, "epoch": epoch,
                      "loss": loss_value, "lr": lr, "t_compute": t_mid - t0,
                      "t_reduce": (t2 - t1) + (t0 - t_lock), "t_update": t1 - t_mid,
                      "bytes_sent_cum": node.stats.bytes_sent,
                      "interaction": outcome})
                step += 1
                if progress is not None and rank == 0:
                    progress(step, total, loss_value)
            last_epoch_loss = sum(losses) / max(1, len(losses))
            finished = step >= total or epoch == epochs - 1 or diverged is not None
            if rank == 0 and (epoch + 1) % eval_every == 0 and not finished:
                with node.lock:
                    local = task.evaluate(model)
                emit({"kind": "eval", "method": name, "rank": rank, "step": step, "epoch": epoch + 1,
                      "bytes_sent_cum": node.stats.bytes_sent, "model": "local", **local})
            if diverged is not None:
                break
        t1 = time.perf_counter()
        while node.pending:
            o = node.poll(swarm.exchange_timeout)
            if o is not None:
                outcomes[o] = outcomes.get(o, 0) + 1
        t_sync += time.perf_counter() - t1
        wall = time.perf_counter() - start
        # Go on answering peers until every one has taken its last step (bounded): a worker
        # that falls behind keeps averaging with the others instead of training alone, which
        # on a loaded machine was up to two thirds of its steps and spread the models apart.
        store.set(f"{job}/done/{rank}", b"1")
        late = _wait_keys(store, [f"{job}/done/{r}" for r in range(world_size)],
                          time.monotonic() + timeout)
        if late:
            log.warning("rank %d: %d peer(s) had not finished within %.0f s", rank, len(late),
                        timeout)
        node.finish()

        with node.lock:
            final = flat.read().astype(np.float32)
        store.set(f"{job}/model/{rank}", final.tobytes())
        gathered = {}
        if rank == 0:
            gathered = _gather_and_evaluate(task, model, flat, store, job, world_size,
                                            time.monotonic() + timeout)
            store.set(f"{job}/collected", b"1")
            emit({"kind": "eval", "method": name, "rank": rank, "step": step, "epoch": epochs,
                  "bytes_sent_cum": node.stats.bytes_sent, "model": "average",
                  **gathered["evaluation"]})
        elif _wait_keys(store, [f"{job}/collected"], time.monotonic() + timeout):
            log.warning("rank %d: rank 0 did not gather the final models within %.0f s", rank, timeout)
    finally:
        node.close()
        sys.setswitchinterval(switch_interval)

    stats = node.stats.as_dict()
    steps = max(1, step)
    summary: dict[str, Any] = {
        "method": name, "rank": rank, "steps": step, "wall_s": wall,
        "evaluation": gathered.get("evaluation", {}), "final_train_loss": last_epoch_loss,
        "bytes_sent": stats["bytes_sent"], "bytes_received": stats["bytes_received"],
        "packets": 0, "rounds_per_step": 0.0, "wraps": 0, "clip_fraction": 0.0,
        "max_abs_sum": 0, "max_abs_q": 0, "bits_needed": 0,
        "max_abs_sum_after_first_step": 0, "bits_needed_after_first_step": 0,
        "time_per_step": {"compute": t_compute / steps, "quantize": stats["t_quantize"] / steps,
                          "communicate": t_sync / steps, "decode": stats["t_decode"] / steps,
                          "reduce": t_sync / steps, "update": t_update / steps},
        "params_digest": params_digest(model), "diverged": diverged,
        "decentralized": True,
        "sync_fraction": t_sync / wall if wall > 0 else 0.0,
        "interactions": stats["interactions"] + stats["served"],
        "examples_seen": step * shard.batch_size if hasattr(shard, "batch_size") else None,
        "shard_size": len(shard.x) if hasattr(shard, "x") else None,
        "swarm": {"config": asdict(swarm), "outcomes": outcomes, **stats},
    }
    for key in ("worst_node", "node_evaluations", "model_spread", "missing_ranks"):
        if key in gathered:
            summary[key] = gathered[key]
    return summary


def _gather_and_evaluate(task: Task, model: torch.nn.Module, flat: _FlatModel, store, job: str,
                         world_size: int, deadline: float) -> dict[str, Any]:
    """Rank 0: every final model from the store; evaluate each and their average."""
    keys = [f"{job}/model/{r}" for r in range(world_size)]
    missing = set(_wait_keys(store, keys, deadline))
    ranks, vectors = [], []
    for r in range(world_size):
        if keys[r] in missing:
            continue
        raw = store.get(keys[r])
        # A peer's bytes: size and values checked before use, as on the gossip sockets.
        vec = (np.frombuffer(raw, dtype="<f4").astype(np.float64)
               if len(raw) == 4 * flat.numel else None)
        if vec is None or not np.isfinite(vec).all():
            log.warning("swarmsgd: rank %d's final model is malformed (%d bytes, expected %d, "
                        "or non-finite values); left out of the average", r, len(raw),
                        4 * flat.numel)
            missing.add(keys[r])
            continue
        ranks.append(r)
        vectors.append(vec)
    if not vectors:  # rank 0's own is always there: only a bug gets here
        from switchagg.errors import SwitchTimeout
        raise SwitchTimeout(f"swarmsgd: no usable final model from any rank of job {job!r}",
                            job=job)
    models = np.stack(vectors)
    average = models.mean(0)
    metric, higher = task.metric, task.higher_is_better
    per_node = []
    for r, vec in zip(ranks, models):
        flat.write(vec)
        per_node.append({"rank": r, **task.evaluate(model)})
    flat.write(average)
    evaluation = task.evaluate(model)
    worst = (min if higher else max)(per_node, key=lambda e: e[metric])
    spread = float(np.mean(np.linalg.norm(models - average, axis=1)))
    if missing:
        log.warning("swarmsgd: no final model from rank(s) %s; averaged the other %d",
                    sorted(int(k.rsplit('/', 1)[1]) for k in missing), len(ranks))
    return {"evaluation": evaluation, "node_evaluations": per_node, "worst_node": worst,
            "model_spread": spread, "missing_ranks": sorted(int(k.rsplit('/', 1)[1]) for k in missing)}


def run_swarm(args, task: Task, name: str, emit, config: TrainConfig) -> dict[str, Any]:
    """`switchagg worker`'s entry for swarmsgd: rendezvous, train, write the files, emit events.

    Returns:
        This worker's summary (also written to `summaries/<name>.rank<r>.json` under --out).
    """
    from switchagg.workers.tasks import parse_options

    if args.rank is None or args.world_size is None:
        raise ValueError("swarmsgd needs a rank and a world size from the rendezvous: pass --rank "
                         "and --world-size (or RANK and WORLD_SIZE as torchrun sets them)")
    _, options = split_options(parse_options(args.opt))
    swarm = SwarmConfig.from_options(options)
    rank = args.rank
    emit.rank = rank
    emit("start", method=name)
    store, owned = rendezvous_store(args.master_addr, args.master_port, rank, args.world_size,
                                    args.timeout)
    host = swarm.swarm_host or local_host(args.master_addr or "127.0.0.1")
    job = f"swarm/{args.job}-{name}"
    metrics_file = None
    if args.out:
        os.makedirs(os.path.join(args.out, "metrics"), exist_ok=True)
        metrics_file = open(os.path.join(args.out, "metrics", f"{name}.rank{rank}.jsonl"), "w")
    try:
        summary = train_swarm(
            task, rank=rank, world_size=args.world_size, config=config, swarm=swarm, store=store,
            job=job, host=host, timeout=args.timeout, name=name,
            sink=(lambda r: metrics_file.write(json.dumps(r) + "\n")) if metrics_file else None,
            progress=lambda s, t, lo: emit.progress(name, s, t, lo))
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if owned:
            _release_store(store, job, rank, args.world_size)
    summary["collective"] = "peer"
    if args.out:
        os.makedirs(os.path.join(args.out, "summaries"), exist_ok=True)
        with open(os.path.join(args.out, "summaries", f"{name}.rank{rank}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    emit("done", method=name, summary=summary)
    log.info("rank %d %s: %d steps in %.1f s, sync %.1f%% of wall", rank, name, summary["steps"],
             summary["wall_s"], 100 * summary["sync_fraction"])
    return summary


def _release_store(store, job: str, rank: int, world_size: int, grace: float = 10.0) -> None:
    # Rank 0 hosts our own TCPStore: it must outlive the others' last reads.
    try:
        if rank != 0:
            store.add(f"{job}/left", 1)
            return
        deadline = time.monotonic() + grace
        while store.add(f"{job}/left", 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, OSError) as exc:  # the store's host is gone: nothing left to release
        log.debug("rank %d: releasing the rendezvous store: %s", rank, exc)
