"""`switchagg report DIR`: the table, results.json and plots of a run whose ranks wrote DIR.

What it owns: merging what the workers of a compose or cluster run left in one folder (or in
copies of one folder from every node, gathered into DIR) into the same outputs `switchagg compare`
makes, with the same code (workers/report.py). What it must never do: train, talk to a switch, or
change the per-rank files it reads.

How it works: DIR/config.json (written by every worker: the run's settings and provenance) gives
the task's metric, the method order and the world size; DIR/summaries/<method>.rank<r>.json are the
per-rank summaries, merged per method by `report.merge_ranks`; DIR/metrics/<method>.rank0.jsonl
feeds the plots. A method with fewer ranks than the run's world size is reported and merged from
the ranks present (its row says how many, in results.json's "workers"). One line per method on
stderr says what was merged.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Any

__all__ = ["configure", "main", "collect"]

_SUMMARY = re.compile(r"^(?P<method>.+)\.rank(?P<rank>\d+)\.json$")


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `switchagg report`."""
    parser.add_argument("dir", metavar="DIR",
                        help="the run's folder (the workers' --out): config.json, summaries/, metrics/")


def collect(run_dir: str) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """(config.json's content or {}, method -> per-rank summaries) of a run folder.

    Raises:
        ValueError: DIR has no summaries.
    """
    meta: dict[str, Any] = {}
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            meta = json.load(f)
    found: dict[str, list[dict]] = {}
    for file in sorted(glob.glob(os.path.join(run_dir, "summaries", "*.rank*.json"))):
        m = _SUMMARY.match(os.path.basename(file))
        if m:
            with open(file) as f:
                found.setdefault(m["method"], []).append(json.load(f))
    if not found:
        raise ValueError(f"{run_dir} has no summaries/<method>.rank<r>.json: is it a worker's --out?")
    order = meta.get("config", {}).get("methods") or []
    methods = {m: found[m] for m in order if m in found}
    methods.update({m: s for m, s in found.items() if m not in methods})
    return meta, methods


def main(args: argparse.Namespace) -> int:
    """Entry point; 0 (written), 2 (DIR is not a run folder)."""
    from switchagg.workers import report
    from switchagg.workers.provenance import provenance

    run_dir = os.path.abspath(args.dir)
    if not os.path.isdir(run_dir):
        print(f"switchagg report: error: {args.dir}: no such folder", file=sys.stderr)
        return 2
    try:
        meta, summaries = collect(run_dir)
    except ValueError as exc:
        print(f"switchagg report: error: {exc}", file=sys.stderr)
        return 2
    config = dict(meta.get("config") or {})
    if "metric" not in config:  # no config.json: the headline is accuracy where the task has it
        first = next(iter(summaries.values()))[0].get("evaluation") or {}
        config["metric"] = "accuracy" if "accuracy" in first else "loss"
    world = config.get("workers")
    methods = {}
    for name, ranks in summaries.items():
        methods[name] = report.merge_ranks(ranks, config["metric"])
        methods[name]["diverged"] = next((s.get("diverged") for s in ranks if s.get("diverged")), None)
        missing = f" (of {world}: ranks missing)" if world and len(ranks) < world else ""
        print(f"switchagg report: {name}: {len(ranks)} ranks{missing}, "
              f"{methods[name]['steps']} steps", file=sys.stderr, flush=True)
    config.setdefault("workers", max(m["workers"] for m in methods.values()))
    config["methods"] = list(methods)
    results = {"config": config, "methods": methods,
               "provenance": {"run": meta.get("provenance"), "report": provenance()}}
    records = {m: report.read_jsonl(os.path.join(run_dir, "metrics", f"{m}.rank0.jsonl"))
               for m in methods}
    files = report.write_all(run_dir, results, records)
    print(report.format_table(methods, config["metric"]))
    print(f"\nwrote {run_dir}/ " + ", ".join(os.path.basename(p) for p in files))
    return 0
