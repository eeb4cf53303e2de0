"""`switchagg reproduce`: the source papers' claims, measured at small scale, in one report.

What it owns: the fixed set of configurations (`RUNS`: task, workers, methods, budget, seeds),
running them one after the other with `switchagg compare`'s machinery (`run_compare`: one switch
and N worker processes per configuration and seed), and writing the report: `report.md` (each
claim of the papers with the figure measured, the paper's figure where it gives one, a verdict),
`claims.json` (the same, machine-readable, with every run's merged results) and the runs' own
folders (results.json, metrics, PNG plots). The claims themselves live in `workers/claims.py`.
What it must never do: download data (a5a comes from `--a5a PATH`; without it the logistic-
regression claims say they were skipped), or change what a claim measures between `--quick` and
the full set (only sizes and seeds shrink).

How it works: `plan(quick, a5a)` lists (run, seed) pairs; each runs into `OUT/runs/NAME-seedS/`,
and a progress line with the elapsed time and the estimate left goes to stderr after each. A run
that fails is recorded with its error (the claims it feeds say "not run") and the others go on.
Methods that other issues add (baselines, SwarmSGD) join the full set's runs that list them in
`optional` when they are registered, and their claims are measured; otherwise (and under
`--quick`) those claims say "not run" or "not in this build".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Run", "RUNS", "plan", "configure", "main", "run_all"]

#: Methods every run may use; `optional` ones join only when registered (other issues add them).
BASE = ("sgd", "intsgd-random", "intsgd-determ", "intsgd-block", "intdiana", "heuristic-switchml",
        "heuristic-global")
BASELINES = ("qsgd-4bit", "qsgd-8bit", "natsgd", "terngrad", "onebit-ef", "powersgd",
             "isgq-mse", "isgq-dithered", "swarmsgd")


@dataclass(frozen=True)
class Run:
    """One configuration of the fixed set (each seed is one `switchagg compare`).

    Attributes:
        name: folder and claim key.
        task, workers, methods, bits: as `switchagg compare`'s options.
        seeds: the full set's seeds; `--quick` runs the first one.
        epochs, quick_epochs: epochs of the full set and of `--quick`.
        opts: task options (--opt); `quick_opts` override them under `--quick`.
        optional: registered baselines that join this run.
        needs_a5a: the logistic-regression runs read the a5a file given by `--a5a`.
        estimate_s, quick_estimate_s: seconds one seed takes on the project's loaded 2-core
            machine (full set; `--quick`), measured or scaled from a measured run.
        quick: part of `--quick`.
    """

    name: str
    task: str
    workers: int
    methods: tuple[str, ...]
    epochs: int
    quick_epochs: int
    bits: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    opts: tuple[str, ...] = ()
    quick_opts: tuple[str, ...] = ()
    eval_every: int | None = None
    optional: tuple[str, ...] = ()
    needs_a5a: bool = False
    estimate_s: float = 60.0
    quick_estimate_s: float = 60.0
    quick: bool = True
    method_opts: tuple[str, ...] = field(default=())


#: The fixed set. Sizes: digits' 200 steps per method as `switchagg compare`; the logistic
#: regression full-batch (one step an epoch) long enough for IntSGD's integers to grow;
#: Fashion-MNIST the task's preset (3 epochs, warm-up and decay).
RUNS: tuple[Run, ...] = (
    Run("digits-4", "digits", 4, BASE, epochs=20, quick_epochs=8, optional=BASELINES,
        estimate_s=100, quick_estimate_s=55),
    Run("digits-16-int8", "digits", 16, ("sgd", "intsgd-random", "intsgd-determ",
                                         "heuristic-switchml"),
        bits=8, epochs=20, quick_epochs=10, estimate_s=130, quick_estimate_s=95),
    Run("logreg-a5a-4", "logreg", 4, ("sgd", "intsgd-random", "intdiana", "heuristic-switchml"),
        epochs=2000, quick_epochs=600, eval_every=50, needs_a5a=True, estimate_s=360,
        quick_estimate_s=80),
    Run("logreg-a5a-16", "logreg", 16, ("sgd", "intsgd-random", "intdiana"), epochs=2000,
        quick_epochs=0, eval_every=100, needs_a5a=True, estimate_s=900, quick=False),
    Run("fmnist-fc-4", "fashion-mnist", 4, ("sgd", "intsgd-random", "heuristic-switchml"),
        epochs=3, quick_epochs=0, opts=("model='fc'",), optional=("isgq-mse",), estimate_s=480,
        quick=False),
    Run("fmnist-lenet-4", "fashion-mnist", 4, ("sgd", "intsgd-random", "heuristic-switchml"),
        epochs=3, quick_epochs=2, opts=("model='lenet'",),
        quick_opts=("train_size=6000", "test_size=2000"), estimate_s=280, quick_estimate_s=60),
)


def plan(quick: bool, a5a: str | None, *, only: list[str] | None = None,
         seeds: list[int] | None = None) -> tuple[list[tuple[Run, int]], list[str]]:
    """(the (run, seed) pairs to run, notes on what is skipped and why).

    Args:
        quick: the reduced set. a5a: the a5a file (None: its runs are skipped, with a note).
        only: run names to keep (default all). seeds: override each run's seeds.

    Raises:
        ValueError: an unknown run name (the message lists them).
    """
    names = [r.name for r in RUNS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; choose from {', '.join(names)}")
    todo, notes = [], []
    for run in RUNS:
        if only and run.name not in only:
            notes.append(f"{run.name}: not selected (--runs)")
            continue
        if quick and not run.quick:
            notes.append(f"{run.name}: not in the --quick set")
            continue
        if run.needs_a5a and not a5a:
            notes.append(f"{run.name}: skipped: it reads the a5a LIBSVM file; pass --a5a PATH "
                         f"(the LIBSVM data collection's a5a)")
            continue
        for seed in seeds if seeds is not None else (run.seeds[:1] if quick else run.seeds):
            todo.append((run, seed))
    return todo, notes


def methods_of(run: Run, quick: bool = False) -> list[str]:
    """The run's methods: its own, plus (full set only) its optional ones that are registered."""
    from switchagg.methods import METHODS, OWN_LOOP
    known = {*METHODS, *OWN_LOOP}
    extra = [] if quick else [m for m in run.optional if m in known]
    return [m for m in run.methods if m in known] + extra


def _compare_args(run: Run, seed: int, quick: bool, a5a: str | None, timeout: float):
    """The argparse.Namespace `switchagg compare` would build for this run."""
    from switchagg.workers.compare import configure
    parser = argparse.ArgumentParser()
    configure(parser)
    argv = ["--task", run.task, "--workers", str(run.workers), "--seed", str(seed),
            "--bits", str(run.bits), "--epochs", str(run.quick_epochs if quick else run.epochs),
            "--methods", ",".join(methods_of(run, quick)), "--timeout", str(timeout), "--no-progress"]
    if run.eval_every:
        argv += ["--eval-every", str(run.eval_every)]
    opts = dict(o.split("=", 1) for o in run.opts)
    if quick:
        opts.update(dict(o.split("=", 1) for o in run.quick_opts))
    for key, value in opts.items():
        argv += ["--opt", f"{key}={value}"]
    for opt in run.method_opts:
        argv += ["--method-opt", opt]
    if run.needs_a5a:
        argv += ["--data", a5a]
    args = parser.parse_args(argv)
    args.method_list = args.methods.split(",")
    return args


def run_one(run: Run, seed: int, out_dir: str, *, quick: bool, a5a: str | None,
            timeout: float) -> dict[str, Any]:
    """One (run, seed) through `run_compare`; its merged results (and files in out_dir)."""
    from switchagg.workers import report
    from switchagg.workers.compare import run_compare
    from switchagg.workers.tasks import make_task, parse_options
    args = _compare_args(run, seed, quick, a5a, timeout)
    task = make_task(args.task, data=args.data, **parse_options(args.opt))
    os.makedirs(out_dir, exist_ok=True)
    started = time.monotonic()
    summaries = run_compare(args, out_dir)
    methods = {m: report.merge_ranks(s, task.metric) for m, s in summaries.items()}
    for name, per_rank in summaries.items():
        methods[name]["diverged"] = next((s.get("diverged") for s in per_rank
                                          if s.get("diverged")), None)
    config = {**task.describe(), "run": run.name, "workers": run.workers, "seed": seed,
              "bits": run.bits, "epochs": args.epochs, "methods": args.method_list,
              "wall_s": time.monotonic() - started}
    report.write_results(os.path.join(out_dir, "results.json"), config, methods)
    records = {m: report.read_jsonl(os.path.join(out_dir, "metrics", f"{m}.rank0.jsonl"))
               for m in args.method_list}
    report.plot_all(out_dir, records, task.metric, log_metric=task.metric == "suboptimality")
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(report.format_table(methods, task.metric) + "\n")
    # The claims read the integer range per step: keep rank 0's series, small.
    series = {m: [{k: r.get(k) for k in ("step", "max_abs_q", "max_abs_sum", "lr", "scaling",
                                                  "rounds", "clip_fraction")}
                  for r in recs if r["kind"] == "step"] for m, recs in records.items()}
    return {"config": config, "methods": methods, "series": series, "error": None}


def run_all(out: str, *, quick: bool, a5a: str | None, timeout: float = 300.0,
            runs: list[tuple[Run, int]] | None = None, notes: list[str] | None = None,
            progress=None) -> dict[str, Any]:
    """Run the plan (or the given pairs) and write the report; returns claims.json's content."""
    from switchagg.workers import claims
    if runs is None:
        runs, notes = plan(quick, a5a)
    notes = list(notes or [])
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    cost = (lambda r: r.quick_estimate_s) if quick else (lambda r: r.estimate_s)
    estimate = sum(cost(r) for r, _ in runs)
    say(f"switchagg reproduce: {len(runs)} runs ({'quick' if quick else 'full'} set), expected "
        f"about {estimate / 60:.0f} min on a loaded 2-core machine; output in {out}")
    for note in notes:
        say(f"  note: {note}")
    results: dict[str, list[dict]] = {}
    started = time.monotonic()
    left = estimate
    for i, (run, seed) in enumerate(runs, 1):
        t0 = time.monotonic()
        folder = os.path.join(out, "runs", f"{run.name}-seed{seed}")
        try:
            res = run_one(run, seed, folder, quick=quick, a5a=a5a, timeout=timeout)
        except Exception as exc:  # recorded; the claims it feeds say "not run"
            res = {"config": {"run": run.name, "seed": seed}, "methods": {}, "series": {},
                   "error": f"{type(exc).__name__}: {exc}"[:2000]}
        res["folder"] = os.path.relpath(folder, out)
        results.setdefault(run.name, []).append(res)
        took = time.monotonic() - t0
        left = max(left - cost(run), 0.0)
        status = "failed: " + res["error"].splitlines()[0] if res["error"] else "done"
        say(f"[{i}/{len(runs)}] {run.name} seed {seed}: {status} in {took:.0f} s "
            f"(elapsed {(time.monotonic() - started) / 60:.1f} min, "
            f"about {left / 60:.0f} min left)")
    content = claims.evaluate(results, quick=quick, notes=notes,
                              wall_s=time.monotonic() - started)
    claims.write_report(out, content, results)
    return content


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `switchagg reproduce`."""
    parser.add_argument("--out", default="reproduce", help="report folder (default ./reproduce)")
    parser.add_argument("--quick", action="store_true",
                        help="the reduced set: one seed, fewer steps, no 16-worker logistic "
                             "regression or FC network (a few minutes)")
    parser.add_argument("--a5a", default=None, metavar="PATH",
                        help="the a5a LIBSVM file for the logistic-regression claims (without it "
                             "they are skipped, and the report says so)")
    parser.add_argument("--runs", default=None, metavar="NAMES",
                        help=f"comma-separated subset of the runs ({', '.join(r.name for r in RUNS)})")
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="comma-separated seeds instead of each run's (e.g. 0)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds any collective may wait before a run fails")


def main(args: argparse.Namespace) -> int:
    """Entry point of `switchagg reproduce`; 0 when the report was written, 2 on bad usage."""
    if args.a5a and not os.path.exists(args.a5a):
        print(f"switchagg reproduce: --a5a {args.a5a}: no such file", file=sys.stderr)
        return 2
    try:
        only = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else None
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds else None
        runs, notes = plan(args.quick, args.a5a, only=only, seeds=seeds)
    except ValueError as exc:
        print(f"switchagg reproduce: {exc}", file=sys.stderr)
        return 2
    try:
        content = run_all(os.path.abspath(args.out), quick=args.quick, a5a=args.a5a,
                          timeout=args.timeout, runs=runs, notes=notes)
    except KeyboardInterrupt:
        print("\nswitchagg reproduce: interrupted", file=sys.stderr)
        return 130
    print(json.dumps({c["id"]: c["verdict"] for c in content["claims"]}, indent=1))
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'report.md')}")
    return 0
