"""`switchagg worker`: one training worker, for docker compose, torchrun, a cluster, or `compare`.

What it owns: one worker process's life: who it is (rank, world size, from torchrun's environment
or flags, or assigned by the switch), its transports (the switch for the methods it can sum,
torch.distributed for the others), and running the chosen methods one after the other on fresh
DDP models (each with the method's hook, `switchagg.ddp.hook_for`), writing per-step metrics and
a summary per method. What it must never do: start a switch or other workers
(that is `switchagg compare`, or compose), or wait without a bound.

How it works:
- Before anything: every option checked (workers/validate.py; exit status 2), and the switch
  probed (workers/probe.py) for up to `--connect-timeout` seconds.
- Identity: `--rank/--world-size/--master-addr/--master-port`, defaulting to RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT as torchrun sets them; or `--rendezvous HOST:PORT` (compose
  replicas): the rank and the torch.distributed store come from `switchagg rendezvous`
  (workers/rendezvous.py), which the worker tells when it is done. Without either, the switch
  assigns a rank at JOIN (only for integer methods: torch.distributed needs a rank up front).
- Transports: torch.distributed (gloo on CPU, nccl on CUDA) is initialized once: the job's group
  when a rendezvous is given (needed by `sgd` and the other non-switch methods, or without
  `--switch`), else a group of this process alone, which DDP needs for its own bookkeeping while
  the hook sums through the switch. Each switch method gets its own switch job
  (`<job>-<method>`), so methods never share slots or counters.
- Outputs (with `--out DIR`): `config.json` (the run's settings and provenance),
  `metrics/<method>.rank<r>.jsonl` (every step; rank 0 also the evaluations) and
  `summaries/<method>.rank<r>.json`; `switchagg report DIR` merges them.
- With `--events`, one JSON line per event goes to stdout, prefixed by `EVENT_PREFIX`: start,
  progress (rank 0, at most ~5 per second), done (with the summary), error (with the traceback).
  `switchagg compare` reads them; anything else on stdout is ignored by it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

__all__ = ["EVENT_PREFIX", "configure", "main", "device_for_local_rank", "add_training_options",
           "training_config", "run_methods", "collective_kind", "method_names", "method_options",
           "check_method_options"]

log = logging.getLogger("switchagg.worker")

#: Marks event lines on a worker's stdout (everything else there is ordinary output).
EVENT_PREFIX = "@@switchagg-event "


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `compare` and `worker`: task, methods, training overrides, integers."""
    from switchagg.methods import METHOD_SETS, METHODS, OWN_LOOP
    from switchagg.packet import VALID_K
    g = parser.add_argument_group("training")
    g.add_argument("--task", default="digits",
                   help="digits (bundled), logreg, fashion-mnist, cifar10-resnet18, wikitext2-lstm, custom (your "
                        "model and data: --opt model=MOD:FN --opt dataset=MOD:FN), or module:function "
                        "for your own task factory")
    g.add_argument("--data", default=None, help="local data file/folder for the task (default: the "
                                                "task's bundled data, where it has some)")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, repeatable (e.g. --opt hidden=(64,) --opt lam=1e-3; default: "
                        "the task's own); swarmsgd's too (local_steps, quant, quant_bits, graph, "
                        "degree, ...)")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated methods, from {', '.join([*METHODS, *OWN_LOOP])}, "
                        f"'all' (the default) or a paper's set: {', '.join(METHOD_SETS)}")
    g.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="codec option, repeatable, for every chosen method that takes it (e.g. "
                        "--method-opt first_step=fixed-alpha; uncompressed runs over "
                        "torch.distributed; default: each method's own)")
    g.add_argument("--epochs", type=int, default=None, help="epochs >= 1 (default: the task's preset)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop each method after N steps (default: no limit)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="examples per worker per step, 0 for the whole shard (default: the task's "
                        "preset)")
    g.add_argument("--lr", type=float, default=None,
                   help="initial learning rate > 0 (default: the task's preset)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N epochs (default: the task's preset)")
    g.add_argument("--seed", type=int, default=0, help="fixes data order, init and rounding")
    g.add_argument("--bits", type=int, default=32, choices=(8, 16, 32),
                   help="integer budget per sum (workers clip to fit)")
    g.add_argument("--k", type=int, default=64, choices=VALID_K, metavar="K",
                   help=f"int32 values per packet, one of {', '.join(map(str, VALID_K))}")
    g.add_argument("--slots", type=int, default=8192,
                   help="switch slot pool size, 1 to 32768 (the switch may grant fewer to a job)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds any collective may wait before failing")


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `switchagg worker`."""
    add_training_options(parser)
    g = parser.add_argument_group("identity and transport")
    g.add_argument("--rank", type=int, default=_env_int("RANK"), help="this worker (default $RANK)")
    g.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE"),
                   help="number of workers (default $WORLD_SIZE)")
    g.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"),
                   help="torch.distributed rendezvous host (default $MASTER_ADDR)")
    g.add_argument("--master-port", type=int, default=_env_int("MASTER_PORT"),
                   help="torch.distributed rendezvous port (default $MASTER_PORT)")
    g.add_argument("--switch", default=os.environ.get("SWITCHAGG_SWITCH"),
                   help="switch address tcp://HOST:PORT (default $SWITCHAGG_SWITCH)")
    g.add_argument("--job", default="switchagg", help="job name prefix at the switch")
    g.add_argument("--token", default=os.environ.get("SWITCHAGG_TOKEN", ""),
                   help="the switch's (or the job's) token (default $SWITCHAGG_TOKEN)")
    g.add_argument("--switch-key", default=os.environ.get("SWITCHAGG_SWITCH_KEY") or None,
                   help="the switch's CURVE public key or key file (default $SWITCHAGG_SWITCH_KEY)")
    g.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the switch to answer a probe before starting")
    g.add_argument("--rendezvous", default=os.environ.get("SWITCHAGG_RENDEZVOUS"), metavar="HOST:PORT",
                   help="take a rank and the torch.distributed store from `switchagg rendezvous` "
                        "(compose replicas; default $SWITCHAGG_RENDEZVOUS)")
    g.add_argument("--out", default=None, help="folder for metrics and summaries (default: none written)")
    g.add_argument("--events", action="store_true", help="print JSON event lines (for compare)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def training_config(args: argparse.Namespace):
    """The TrainConfig the options describe."""
    from switchagg.workers.train import TrainConfig
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       max_steps=args.max_steps, eval_every=args.eval_every, seed=args.seed)


def method_names(spec: str | None) -> list[str]:
    """Resolve a comma-separated method list against the registry; "all" and the papers' sets
    (`switchagg.methods.METHOD_SETS`: paper-intsgd, paper-isgq) expand in place, once each.

    Raises:
        ValueError: naming an unknown method and listing the valid ones.
    """
    from switchagg.methods import METHOD_SETS, METHODS, OWN_LOOP
    valid = [*METHODS, *OWN_LOOP]
    if not spec:
        return valid
    names: list[str] = []
    for n in (n.strip() for n in spec.split(",")):
        expanded = valid if n == "all" else list(METHOD_SETS.get(n, [n] if n else []))
        names += [m for m in expanded if m not in names]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(valid)}, all, "
                         f"{', '.join(METHOD_SETS)}")
    return names


class _Emitter:
    """Event lines on stdout (for compare) and the per-method output files."""

    def __init__(self, enabled: bool, rank: int) -> None:
        self.enabled, self.rank = enabled, rank
        self._last_progress = 0.0

    def __call__(self, event: str, **fields: Any) -> None:
        if self.enabled:
            sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, "rank": self.rank, **fields},
                                                       default=str) + "\n")
            sys.stdout.flush()

    def progress(self, method: str, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if step == total or now - self._last_progress >= 0.2:
            self._last_progress = now
            self(event="progress", method=method, step=step, total=total, loss=loss)


def collective_kind(name: str, options: dict | None = None) -> str:
    """What the named method needs of its collective ("int": the switch will do; "torch"), with
    its codec options (an uncompressed first step sends floats, which the switch cannot add)."""
    from switchagg.codecs._first_step import needs_float_sum
    from switchagg.methods import collective_kind as kind_of
    return "torch" if needs_float_sum(options or {}) else kind_of(name)


def method_options(name: str, pairs: list[str] | None) -> dict[str, Any]:
    """The `--method-opt` settings the named method's codec takes (others are for other methods)."""
    import inspect

    from switchagg.methods import METHODS
    from switchagg.workers.tasks import parse_options
    if name not in METHODS:          # a method with its own loop (SwarmSGD) takes no codec options
        return {}
    codec = METHODS[name].codec
    takes = {p for cls in codec.__mro__ if "__init__" in vars(cls)
             for p in inspect.signature(cls.__init__).parameters}
    return {k: v for k, v in parse_options(pairs).items() if k in takes}


def check_method_options(names: list[str], pairs: list[str] | None) -> None:
    """Raise ValueError naming a `--method-opt` key that no chosen method takes."""
    from switchagg.workers.tasks import parse_options
    used = set().union(*(method_options(n, pairs) for n in names)) if names else set()
    unused = sorted(set(parse_options(pairs)) - used)
    if unused:
        raise ValueError(f"--method-opt {', '.join(unused)}: no chosen method ({', '.join(names)}) "
                         f"takes it")


def _open_client(args: argparse.Namespace, rank: int | None, world_size: int, method: str):
    """This worker's switch client for one method's job (joined; the rank may come from it)."""
    from switchagg.client import ClientConfig, SwitchClient
    from switchagg.errors import JoinRejected
    config = ClientConfig(k=args.k, slots=args.slots, burst=min(ClientConfig.burst, args.slots))
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            return SwitchClient(args.switch, f"{args.job}-{method}", world_size, rank=rank,
                                config=config, timeout=args.timeout, token=args.token,
                                server_key=args.switch_key)
        except JoinRejected as exc:
            # The previous method's job frees its slots only when its last worker leaves;
            # a fast worker may get here first. Anything else rejected is final.
            if exc.field != "slots" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _init_process_group(args: argparse.Namespace, names: list[str]) -> None:
    """torch.distributed for DDP: the job's group when a rendezvous is given; else, when every
    method sums in the switch (ranks assigned at JOIN, as in compose), a group of this process
    alone, which DDP needs for its bookkeeping while the hook talks to the switch."""
    import torch.distributed as dist
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    rendezvous = None not in (args.rank, args.world_size) and args.master_addr and args.master_port
    needs_torch = not args.switch or any(
        collective_kind(n, method_options(n, args.method_opt)) in ("torch", "peer") for n in names)
    if getattr(args, "store", None) is not None:  # from `switchagg rendezvous` (workers/rendezvous.py)
        from switchagg.workers.rendezvous import process_group_store
        dist.init_process_group(backend, store=process_group_store(args.store), rank=args.rank,
                                world_size=args.world_size,
                                timeout=datetime.timedelta(seconds=args.timeout))
    elif rendezvous:
        dist.init_process_group(backend, init_method=f"tcp://{args.master_addr}:{args.master_port}",
                                rank=args.rank, world_size=args.world_size,
                                timeout=datetime.timedelta(seconds=args.timeout))
    elif needs_torch:
        raise ValueError("torch.distributed (for sgd and the other non-switch methods, swarmsgd's "
                         "rendezvous, or without --switch) needs --rank, --world-size, --master-addr and --master-port (or "
                         "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them)")
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def run_methods(args: argparse.Namespace, names: list[str], emit: "_Emitter | _Tracked") -> dict[str, dict]:
    """Run each method in turn on a fresh DDP model; returns method -> this worker's summary."""
    import torch.distributed as dist

    from switchagg.ddp import hook_for
    from switchagg.workers.tasks import make_task, parse_options
    from switchagg.workers.swarm_train import split_options
    from switchagg.workers.train import train

    config = training_config(args)
    task_options, _ = split_options(parse_options(args.opt))  # swarmsgd's options are not the task's
    task = make_task(args.task, data=args.data, device=args.device, **task_options)
    if args.world_size is None:
        raise ValueError("the world size is unknown: pass --world-size or set WORLD_SIZE")
    _init_process_group(args, names)
    # Load the CPU kernels now: a compilation mid-step would hold the GIL for seconds (stalling
    # the step and the switch client's heartbeats). The multi-threaded variants only where DDP's
    # buckets are large enough to use them: loaded, their threads spin beside torch's on shared
    # cores (measured: 4x slower steps of the default digits run).
    from switchagg.kernels import PARALLEL_MIN_ELEMENTS
    from switchagg.warmup import warm_up
    numel = sum(p.numel() for p in task.build_model().parameters())
    warm_up(parallel=numel >= PARALLEL_MIN_ELEMENTS)
    results: dict[str, dict] = {}
    try:
        for name in names:
            options = method_options(name, args.method_opt)
            kind = collective_kind(name, options)
            if kind == "peer":  # SwarmSGD owns its loop and talks to its peers (no collective)
                from switchagg.workers.swarm_train import run_swarm
                results[name] = run_swarm(args, task, name, emit, config)
                continue
            client = None
            if kind == "int" and args.switch:
                client = _open_client(args, args.rank, args.world_size, name)
            state, _ = hook_for(name, switch=None, client=client, job=f"{args.job}-{name}",
                                world_size=None if client else args.world_size,
                                rank=None if client else args.rank, seed=args.seed,
                                bits=args.bits, timeout=args.timeout, **options)
            rank = state.rank
            emit.rank = rank
            emit("start", method=name)
            try:
                metrics_file = None
                if args.out:
                    os.makedirs(os.path.join(args.out, "metrics"), exist_ok=True)
                    metrics_file = open(os.path.join(args.out, "metrics", f"{name}.rank{rank}.jsonl"), "w")

                def sink(record: dict, _f=metrics_file) -> None:
                    if _f is not None:
                        _f.write(json.dumps(record) + "\n")

                try:
                    summary = train(task, state, rank=rank, world_size=args.world_size,
                                    config=config, sink=sink,
                                    progress=lambda s, t, lo: emit.progress(name, s, t, lo))
                finally:
                    if metrics_file is not None:
                        metrics_file.close()
                summary["collective"] = "switch" if client is not None else "torch"
            finally:
                state.close()
                if client is not None:
                    client.close()
            results[name] = summary
            if args.out:
                os.makedirs(os.path.join(args.out, "summaries"), exist_ok=True)
                with open(os.path.join(args.out, "summaries", f"{name}.rank{rank}.json"), "w") as f:
                    json.dump(summary, f, indent=1)
            emit("done", method=name, summary=summary)
            log.info("rank %d %s: %d steps in %.1f s", rank, name, summary["steps"], summary["wall_s"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return results


def device_for_local_rank(device: str, local_rank: str | None) -> str:
    """`cuda` means this process's own GPU: torchrun starts one process per GPU of a node and sets
    LOCAL_RANK, so without this every process of a multi-GPU node would share GPU 0."""
    if device == "cuda" and local_rank not in (None, ""):
        return f"cuda:{int(local_rank)}"
    return device


def main(args: argparse.Namespace) -> int:
    """Entry point of `switchagg worker`; returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    import torch
    # Workers share the cores with each other and the switch; one thread each avoids
    # oversubscription, and keeps CPU arithmetic in a fixed order (reproducible numbers).
    torch.set_num_threads(1)
    args.device = device_for_local_rank(args.device, os.environ.get("LOCAL_RANK"))
    emit = _Emitter(args.events, args.rank if args.rank is not None else -1)
    current = {"method": None}
    from switchagg.workers import validate
    from switchagg.workers.probe import SwitchUnreachable, wait_for_switch
    try:
        task = validate.check_worker(args)
        names = args.method_list
    except validate.UsageError as exc:
        emit("error", method=None, error="UsageError", message=str(exc), traceback="")
        return validate.report_usage("worker", exc)
    try:
        if args.switch and any(collective_kind(n) == "int" for n in names):
            wait_for_switch(args.switch, args.connect_timeout)
    except SwitchUnreachable as exc:
        print(f"switchagg worker: error: {exc}", file=sys.stderr)
        emit("error", method=None, error="SwitchUnreachable", message=str(exc), traceback="")
        return 1
    args.store = None
    if args.rendezvous:
        from switchagg.workers.rendezvous import join
        try:
            args.store, args.rank = join(args.rendezvous, args.world_size, args.connect_timeout)
        except (RuntimeError, ValueError) as exc:
            print(f"switchagg worker: error: {exc}", file=sys.stderr)
            return 1
        emit.rank = args.rank
    try:
        if args.out:
            _write_config(args, task)
        run_methods(args, names, _Tracked(emit, current))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # report, then fail: compare turns this into a clear error
        log.error("rank %s, method %s failed: %s: %s", emit.rank, current["method"],
                  type(exc).__name__, exc)
        emit("error", method=current["method"], error=type(exc).__name__, message=str(exc),
             traceback=traceback.format_exc())
        _report(args, ok=False)
        return 1
    _report(args, ok=True)
    return 0


def _write_config(args: argparse.Namespace, task) -> None:
    """`--out`/config.json: the run's settings and provenance, which `switchagg report` reads (every
    worker writes the same; a rename makes each write whole)."""
    import tempfile

    from switchagg.workers.provenance import provenance, run_config
    os.makedirs(args.out, exist_ok=True)
    # A temporary name of its own: containers all run as pid 1 on the one mounted folder.
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=args.out)
    with os.fdopen(fd, "w") as f:
        json.dump({"config": run_config(args, task, args.world_size), "provenance": provenance()},
                  f, indent=1, default=str)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(args.out, "config.json"))


def _report(args: argparse.Namespace, ok: bool) -> None:
    """Tell the rendezvous (if any) that this worker finished; a lost rendezvous is only logged."""
    if args.store is not None:
        from switchagg.workers.rendezvous import report
        try:
            report(args.store, ok, args.rendezvous)
        except Exception as exc:  # noqa: BLE001 - the run's own outcome stands
            log.warning("could not report to the rendezvous: %s", exc)


class _Tracked:
    """An emitter that remembers which method is running (for error reports)."""

    def __init__(self, emit: _Emitter, current: dict) -> None:
        self._emit, self._current = emit, current

    @property
    def rank(self) -> int:
        return self._emit.rank

    @rank.setter
    def rank(self, value: int) -> None:
        self._emit.rank = value

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "start":
            self._current["method"] = fields.get("method")
        self._emit(event, **fields)

    def progress(self, method: str, step: int, total: int, loss: float) -> None:
        self._emit.progress(method, step, total, loss)
