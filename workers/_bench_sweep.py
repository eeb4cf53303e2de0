"""`switchagg bench --sweep`: the scaling table, ATE/s against the number of workers, and its plot.

What it owns: running `bench.run_bench` once per (network, worker count), on loopback and (with
`--link RATE`) on emulated links, collecting the switch path's, the ZeroMQ relay's and gloo's
ATE/s, printing them as one table, and drawing them (one line per contender, the link limit
dashed) into a PNG. What it must never do: assert a target (it prints figures) or keep going
after a failed point without saying so (a failed point is reported and left out of the plot).

Why the sweep: SwitchML's headline is that in-network aggregation sends and receives the tensor
once per worker, against 2(n-1)/n times for a ring all-reduce, so on links of a fixed rate its
throughput stays flat as workers are added while a ring's falls towards half (the SwitchML paper,
and p4app-switchML's benchmark). On loopback the same sweep shows what the shared CPU allows
instead: every contender falls as processes are added to the same cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from typing import Any

__all__ = ["default_workers", "plot", "run_sweep", "table"]

log = logging.getLogger("switchagg.bench")

#: What the table and the plot show, per point: (JSON key, label).
CONTENDERS = (("ate_per_s", "switch path (SwitchClient)"),
              ("zmq_ceiling_ate_per_s", "ZeroMQ relay (no sum)"),
              ("gloo_ate_per_s", "gloo ring all-reduce"))


def default_workers() -> list[int]:
    """2, 4, 8, and 16 where the machine has the cores for it (16 processes on 2 cores measure
    the scheduler, not the network)."""
    return [2, 4, 8] + ([16] if (os.cpu_count() or 1) >= 8 else [])


def run_sweep(args: argparse.Namespace, run_bench) -> list[dict[str, Any]]:
    """One `run_bench(args)` per network and worker count; returns every point's figures.

    A point that fails is logged and recorded as {"network", "workers", "error"}.
    """
    networks = [None] + ([args.link] if args.link else [])
    points = []
    for link in networks:
        for n in args.sweep_workers or default_workers():
            point_args = copy.copy(args)
            point_args.workers, point_args.link = n, link
            name = f"link {link}" if link else f"loopback ({args.transport})"
            log.warning("sweep: %s, %d workers", name, n)
            try:
                figures = run_bench(point_args)
            except Exception as exc:  # noqa: BLE001 - report the point, keep the sweep going
                log.error("sweep point %s, %d workers failed: %s", name, n, exc)
                figures = {"workers": n, "link": link, "error": str(exc)}
            figures["network"] = name
            points.append(figures)
    return points


def table(points: list[dict[str, Any]]) -> str:
    """The sweep as text: one row per point, M ATE/s per contender, ratios."""
    lines = [f"{'network':<22}{'workers':>8}{'switch':>9}{'relay':>9}{'gloo':>9}"
             f"{'limit':>9}{'sw/gloo':>9}{'sw/limit':>9}   (M elements/s)"]
    for p in points:
        if "error" in p:
            lines.append(f"{p['network']:<22}{p['workers']:>8}   failed: {p['error'][:60]}")
            continue
        cells = [p.get(key) for key, _ in CONTENDERS] + [p.get("link_limit_ate_per_s")]
        text = "".join(f"{c / 1e6:>9.2f}" if c else f"{'-':>9}" for c in cells)
        ratio = (f"{p['ate_vs_gloo']:>9.2f}" if p.get("ate_vs_gloo") else f"{'-':>9}")
        ratio += (f"{p['ate_vs_link_limit']:>9.2f}" if p.get("ate_vs_link_limit")
                  else f"{'-':>9}")
        lines.append(f"{p['network']:<22}{p['workers']:>8}{text}{ratio}")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], path: str) -> None:
    """ATE/s against workers: a panel per network, a line per contender, the link limit dashed
    (and a ring's ceiling on the link, n/(2(n-1)) of it, dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(p["network"] for p in points))
    fig, axes = plt.subplots(1, len(networks), figsize=(5.2 * len(networks), 3.8), squeeze=False)
    for ax, network in zip(axes[0], networks):
        ok = sorted((p for p in points if p["network"] == network and "error" not in p),
                    key=lambda p: p["workers"])
        workers = [p["workers"] for p in ok]
        for key, label in CONTENDERS:
            xs = [p["workers"] for p in ok if p.get(key)]
            ax.plot(xs, [p[key] / 1e6 for p in ok if p.get(key)], marker="o", label=label)
        limits = [p.get("link_limit_ate_per_s") for p in ok]
        if workers and all(limits):
            ax.plot(workers, [v / 1e6 for v in limits], "k--", label="link limit")
            ax.plot(workers, [p["gloo_link_ceiling_ate_per_s"] / 1e6 for p in ok], "k:",
                    label="ring ceiling, n/(2(n-1)) of it")
        ax.set_title(network)
        ax.set_xlabel("workers")
        ax.set_xscale("log", base=2)
        ax.set_xticks(workers or [2])
        ax.set_xticklabels([str(w) for w in workers] or ["2"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ATE/s (M int32 elements/s)")
    axes[0][-1].legend(fontsize=8)
    cores = next((p.get("cores") for p in points if p.get("cores")), "?")
    numel = next((p.get("numel") for p in points if p.get("numel")), 0)
    fig.suptitle(f"switchagg bench --sweep: {numel * 4 / 2**20:.3g} MiB all-reduce, "
                 f"{cores} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(args: argparse.Namespace, run_bench) -> int:
    """Run the sweep, print the table (or JSON lines), write the PNG; returns 0, or 1 if a point
    failed."""
    points = run_sweep(args, run_bench)
    if args.json:
        for p in points:
            print(json.dumps(p, sort_keys=True))
    else:
        print(table(points))
    plot(points, args.plot)
    print(f"plot written to {args.plot}")
    return 1 if any("error" in p for p in points) else 0
