"""What a comparison shows: per-method results merged over workers, the table, results.json, plots.

What it owns: turning the workers' per-method summaries (workers/train.py) and the rank-0 metric
records (JSON lines) into the three outputs of `switchagg compare`: a text table, `results.json`
and PNG plots. What it must never do: run training or talk to workers; it reads what they wrote.

How it works: `merge_ranks` folds the N workers' summaries of one method into one entry. Sums over
workers where the quantity is per worker and additive (bytes and packets on the wire: `bytes_sent`
is the total all workers put on the wire, `bytes_sent_per_worker` the mean); maxima where every
worker sees the same sum (max |sum|, bits needed, wraps); the evaluation is rank 0's (all replicas
hold the same weights, which `replicas_agree` checks). Plots use matplotlib's Agg backend (no
display needed), one figure per file:
  loss_vs_step.png, loss_vs_bytes.png, <metric>_vs_step.png, <metric>_vs_bytes.png,
  int_magnitude_vs_step.png (max |sum| and max |Q_i| on a log scale, with the int8/int16/int32
  limits drawn), and for logreg also dist2_vs_bytes.png (||x - x*||^2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["merge_ranks", "wire_summary", "format_table", "write_results", "read_jsonl", "plot_all",
           "PLOT_FILES", "TABLE_LEGEND", "write_all", "settings_line"]

#: Plots every comparison writes ("{metric}" is the task's headline metric).
PLOT_FILES = ("loss_vs_step.png", "loss_vs_bytes.png", "{metric}_vs_step.png",
              "{metric}_vs_bytes.png", "int_magnitude_vs_step.png")


def merge_ranks(summaries: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """One results.json entry from every worker's `train()` summary of one method.

    Args:
        summaries: one per rank (any order).
        metric: the task's headline evaluation key.

    Returns:
        The entry: final_loss, final_accuracy (None where the task has none), final_metric, steps,
        wall_s, bytes_sent (all workers), bytes_sent_per_worker, packets, the `wire_summary`
        (coords_per_worker, paper_bits_per_worker, bits_per_coord, paper_bits_per_coord,
        ratio_vs_fp32), rounds_per_step,
        max_abs_sum, max_abs_q, bits_needed (and the same extremes without step 0:
        max_abs_sum_after_first_step, max_abs_q_after_first_step, bits_needed_after_first_step),
        clip_fraction, wraps,
        time_per_step (mean over
        workers), final_train_loss, replicas_agree, evaluation (rank 0's full dict),
        sync_fraction (time synchronizing over wall time, mean over workers), and for
        decentralized methods (SwarmSGD) `decentralized` (workers/swarm_report.py).
    """
    by_rank = sorted(summaries, key=lambda s: s["rank"])
    head = by_rank[0]
    ev = head.get("evaluation") or {}
    n = len(by_rank)
    times = {k: sum(s["time_per_step"][k] for s in by_rank) / n for k in head["time_per_step"]}
    bytes_total = sum(int(s["bytes_sent"]) for s in by_rank)
    entry = {
        "final_loss": ev.get("loss"),
        "final_accuracy": ev.get("accuracy"),
        "final_metric": ev.get(metric),
        "metric": metric,
        "steps": head["steps"],
        "workers": n,
        "wall_s": max(float(s["wall_s"]) for s in by_rank),
        "bytes_sent": bytes_total,
        "bytes_sent_per_worker": bytes_total / n,
        "packets": sum(int(s["packets"]) for s in by_rank),
        **wire_summary(by_rank),
        "rounds_per_step": head["rounds_per_step"],
        "max_abs_sum": max(int(s["max_abs_sum"]) for s in by_rank),
        "max_abs_q": max(int(s["max_abs_q"]) for s in by_rank),
        "bits_needed": max(int(s["bits_needed"]) for s in by_rank),
        "max_abs_sum_after_first_step": max(int(s.get("max_abs_sum_after_first_step", 0))
                                            for s in by_rank),
        "max_abs_q_after_first_step": max(int(s.get("max_abs_q_after_first_step", 0))
                                          for s in by_rank),
        "bits_needed_after_first_step": max(int(s.get("bits_needed_after_first_step", 0))
                                            for s in by_rank),
        "clip_fraction": sum(float(s["clip_fraction"]) for s in by_rank) / n,
        "wraps": max(int(s["wraps"]) for s in by_rank),
        "time_per_step": times,
        "final_train_loss": head.get("final_train_loss"),
        "replicas_agree": len({s["params_digest"] for s in by_rank}) == 1,
        "evaluation": ev,
        "sync_fraction": _sync_fraction(by_rank),
    }
    if any(s.get("decentralized") for s in by_rank):
        entry["replicas_agree"] = None   # every worker keeps its own model, by design
        from switchagg.workers.swarm_report import decentralized_entry
        entry["decentralized"] = decentralized_entry(by_rank, metric)
    return entry


def _sync_fraction(by_rank: list[dict[str, Any]]) -> float:
    """Mean over workers of the share of the time spent synchronizing (not computing).

    A worker that reports `sync_fraction` (SwarmSGD: blocked in its own interactions / wall) gives
    it; for the others (DDP) it is the part of forward + backward that was not compute (the
    hook's encoding and decoding, and the communication backward waited for) over the step."""
    fractions = []
    for s in by_rank:
        if "sync_fraction" in s:
            fractions.append(float(s["sync_fraction"]))
            continue
        t = s["time_per_step"]
        step = t.get("backward", 0.0) + t.get("update", 0.0)
        sync = max(t.get("backward", 0.0) - t.get("compute", 0.0), 0.0)
        fractions.append(sync / step if step > 0 else 0.0)
    return sum(fractions) / len(fractions)


def wire_summary(by_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """What each worker put on the wire per coordinate: real bits (the collective's bytes, packed
    as sent), the paper's encoding's bits, and the compression ratio of the real bits against
    fp32 (32 bits per coordinate)."""
    n = max(1, len(by_rank))
    numel = sum(int(s.get("numel", 0)) for s in by_rank) / n
    sent = sum(int(s["bytes_sent"]) for s in by_rank) / n
    paper = sum(int(s.get("paper_bits", 0)) for s in by_rank) / n
    bits = 8 * sent / numel if numel else None
    return {"coords_per_worker": numel, "paper_bits_per_worker": paper,
            "bits_per_coord": bits,
            "paper_bits_per_coord": paper / numel if numel and paper else None,
            "ratio_vs_fp32": 32 / bits if bits else None}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _both(later: int, overall: int) -> str:
    """"from step 1 / including step 0" of an integer extreme ("0" for float methods)."""
    return str(later) if later == overall else f"{later}/{overall}"


def format_table(methods: dict[str, dict[str, Any]], metric: str = "accuracy") -> str:
    """The summary table, one row per method (fixed-width text).

    Columns: final test loss and headline metric, wall time, ms per step (forward + backward
    through DDP, which overlaps the reduction, + optimizer step) with compute, quantize,
    communicate (the window from the first bucket's launch to the last result, overlapping
    backward) and decode, MB sent per worker, bits per coordinate really sent (`b/coord`, from
    those bytes), in the paper's own encoding (`paper b/c`, e.g. QSGD's Elias code; `-` where the
    method counts none) and the real compression against fp32 (`x fp32`), packets per worker per
    step, rounds per step, the largest per-worker integer max |Q_i| (what a worker's packet must
    hold) and max |sum| (what the switch's adders must), each as "from step 1 / including step 0"
    (IntSGD's step 0 borrows SwitchML's exponent scaling by default), the bits the sum needed from
    step 1 on, clip %,
    wraps.
    """
    pct = metric == "accuracy"
    header = ["method", "loss", "acc %" if pct else metric[:10], "wall s", "ms/step",
              "compute", "sync %", "quant", "comm", "decode", "MB/wkr", "b/coord", "paper b/c",
              "x fp32", "pkt/step", "rounds", "max|Q_i|", "max|sum|",
              "bits", "clip %", "wraps", "agree"]
    rows = [header]
    for name, m in methods.items():
        t = m["time_per_step"]
        workers = max(1, int(m.get("workers", 1)))
        step_ms = 1e3 * sum(t.get(k, 0.0) for k in ("backward", "update"))
        value = m["final_metric"]
        rows.append([
            name, _fmt(m["final_loss"], ".4f"),
            _fmt(100 * value if (pct and value is not None) else value, ".2f" if pct else ".4g"),
            _fmt(m["wall_s"], ".1f"), _fmt(step_ms, ".2f"),
            _fmt(1e3 * t.get("compute", 0.0), ".2f"),
            _fmt(100 * m["sync_fraction"] if m.get("sync_fraction") is not None else None, ".1f"),
            _fmt(1e3 * t.get("quantize", 0.0), ".2f"),
            _fmt(1e3 * t.get("communicate", 0.0), ".2f"), _fmt(1e3 * t.get("decode", 0.0), ".2f"),
            _fmt(m["bytes_sent_per_worker"] / 1e6, ".2f"),
            _fmt(m.get("bits_per_coord"), ".2f"), _fmt(m.get("paper_bits_per_coord"), ".2f"),
            _fmt(m.get("ratio_vs_fp32"), ".1f"),
            _fmt(m["packets"] / workers / max(1, m["steps"]), ".0f"),
            _fmt(m["rounds_per_step"], ".1f"),
            _both(m.get("max_abs_q_after_first_step", m["max_abs_q"]), m["max_abs_q"]),
            _both(m.get("max_abs_sum_after_first_step", m["max_abs_sum"]), m["max_abs_sum"]),
            str(m.get("bits_needed_after_first_step", m["bits_needed"])),
            _fmt(100 * m["clip_fraction"], ".2f"), str(m["wraps"]),
            {True: "yes", False: "NO"}.get(m["replicas_agree"], "-"),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("max|Q_i| (one worker's integers) and max|sum|: from step 1 / including step 0; "
                 "bits: the sum's, from step 1 (IntSGD's step 0 uses SwitchML's exponent scaling "
                 "by default: r is unknown before it)")
    lines.append(TABLE_LEGEND)
    lines.append("sync %: share of a worker's time spent synchronizing (the reduce; for swarmsgd, "
                 "blocked in its own interactions, over wall time)")
    from switchagg.workers.swarm_report import footer_lines
    lines += footer_lines(methods, metric)
    return "\n".join(lines)


#: The table's units, printed under it.
TABLE_LEGEND = "\n".join((
    "units: loss, metric: on the test set (acc %: percent); wall s: seconds per method;",
    "  ms/step and its split (compute, quant, comm, decode): milliseconds per step, mean over workers;",
    "  MB/wkr: megabytes (1e6 B) each worker sent; pkt/step: packets per worker per step; rounds:",
    "  collective rounds per step; max|sum|: largest integer in a sum; bits: bits that sum needs;",
    "  clip %: elements clipped; wraps: int32 wrap-arounds; agree: replicas' parameters bit-identical"))


def write_results(path: str, config: dict[str, Any], methods: dict[str, dict[str, Any]],
                  **extra: Any) -> None:
    """Write results.json: {"config": ..., "methods": {NAME: entry}, **extra} (NaN as null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    with open(path, "w") as f:
        json.dump(clean({"config": config, "methods": methods, **extra}), f, indent=2,
                  sort_keys=False)
        f.write("\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a missing file reads as no records)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _spans_decades(ax, axis: str, decades: float = 2.0) -> bool:
    """Whether the plotted data on `axis` are all positive and span more than `decades` decades."""
    values = [float(v) for line in ax.get_lines() if not line.get_label().startswith("_")
              for v in (line.get_xdata() if axis == "x" else line.get_ydata())]
    values = [v for v in values if math.isfinite(v)]
    positive = [v for v in values if v > 0]
    if not positive or len(positive) < len(values):
        return False
    return math.log10(max(positive) / min(positive)) > decades


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    # Per-step losses of one worker's mini-batch are noisy; an EMA shows the trend.
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def plot_all(out_dir: str, records: dict[str, Iterable[dict[str, Any]]], metric: str,
             *, log_metric: bool = False, title: str = "") -> list[str]:
    """Write the comparison's PNG plots.

    Args:
        out_dir: where to write.
        records: method -> rank 0's step and eval records (workers/train.py).
        metric: the task's headline evaluation key.
        log_metric: plot the metric on a log scale (suboptimality, distances).
        title: the run's settings, under each plot's own title.

    Every axis of positive values that spans more than two decades is drawn on a log scale.

    Returns:
        The paths written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = matplotlib.colormaps["tab20"]
    series = {}
    for name, recs in records.items():
        recs = list(recs)
        steps = [r for r in recs if r["kind"] == "step"]
        evals = [r for r in recs if r["kind"] == "eval"]
        series[name] = (steps, evals)
    written = []

    def save(fig, name: str, what: str) -> None:
        fig.axes[0].set_title(f"{what}\n{title}" if title else what, fontsize=9)
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def line_plot(filename: str, ylabel: str, x_of, y_of, which: int, *, logy=False, xlabel: str):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (name, pair) in enumerate(series.items()):
            recs = pair[which]
            ys = [y_of(r) for r in recs]
            if which == 0 and ylabel.startswith("train loss"):
                ys = _smooth(ys)
            xs = [x_of(r) for r in recs]
            # 16+ methods: 20 distinct colours, and a second line style past them
            ax.plot(xs, ys, label=name, marker="o" if which == 1 else None, markersize=3,
                    color=colours(i % 20), linestyle="-" if i < 20 else "--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy or _spans_decades(ax, "y"):
            ax.set_yscale("log")
        if _spans_decades(ax, "x"):
            ax.set_xscale("log")   # e.g. the compressors' and fp32's bytes
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
        save(fig, filename, f"{ylabel} vs {xlabel}")

    mb = lambda r: r["bytes_sent_cum"] / 1e6  # noqa: E731 (a tiny accessor)
    line_plot("loss_vs_step.png", "train loss (rank 0, EMA 0.9)", lambda r: r["step"],
              lambda r: r["loss"], 0, xlabel="step")
    line_plot("loss_vs_bytes.png", "train loss (rank 0, EMA 0.9)", mb, lambda r: r["loss"], 0,
              xlabel="MB sent per worker")
    line_plot(f"{metric}_vs_step.png", f"test {metric}", lambda r: r["step"], lambda r: r[metric], 1,
              logy=log_metric, xlabel="step")
    line_plot(f"{metric}_vs_bytes.png", f"test {metric}", mb, lambda r: r[metric], 1,
              logy=log_metric, xlabel="MB sent per worker")
    if any("dist2" in r for _, evals in series.values() for r in evals):
        line_plot("dist2_vs_bytes.png", "||x - x*||^2", mb, lambda r: r.get("dist2", math.nan), 1,
                  logy=True, xlabel="MB sent per worker")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (steps, _) in series.items():
        sums = [max(1, int(r.get("max_abs_sum", 0))) for r in steps]
        if any(int(r.get("max_abs_sum", 0)) for r in steps):
            line = ax.plot([r["step"] for r in steps], sums, label=f"{name} max|sum|")[0]
            ax.plot([r["step"] for r in steps], [max(1, int(r.get("max_abs_q", 0))) for r in steps],
                    linestyle=":", color=line.get_color(), label=f"{name} max|Q_i|")
    for bits in (8, 16, 32):
        ax.axhline(2 ** (bits - 1) - 1, color="grey", linewidth=0.8, linestyle="--")
        ax.text(0, 2 ** (bits - 1) * 1.15, f"int{bits}", color="grey", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("integer magnitude")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, "int_magnitude_vs_step.png", "integer magnitudes (dotted: one worker's; int limits dashed)")
    return written


# --- everything a finished run writes (compare and `switchagg report` share it) -----------------

def settings_line(config: dict[str, Any]) -> str:
    """The run's settings in one line, for plot titles ("digits, 4 workers, 32-bit, seed 0")."""
    parts = [str(config.get("task", "?")), f"{config.get('workers', '?')} workers",
             f"{config.get('bits', '?')}-bit budget", f"seed {config.get('seed', '?')}"]
    for key in ("drop", "duplicate", "reorder"):
        if config.get(key):
            parts.append(f"{key} {config[key]}")
    return ", ".join(parts)


def write_all(out_dir: str, results: dict[str, Any], records: dict[str, list[dict]]) -> list[str]:
    """Write results.json, table.txt and the plots of a finished run; returns the paths.

    Args:
        out_dir: the run's folder.
        results: {"config", "methods", "provenance", ...} as results.json holds it.
        records: method -> rank 0's step and eval records.
    """
    config, methods = results["config"], results["methods"]
    metric = config.get("metric", "accuracy")
    path = os.path.join(out_dir, "results.json")
    write_results(path, config, methods,
                  **{k: v for k, v in results.items() if k not in ("config", "methods", "files")})
    table = os.path.join(out_dir, "table.txt")
    with open(table, "w") as f:
        f.write(format_table(methods, metric) + "\n")
    plots = plot_all(out_dir, records, metric, log_metric=metric in ("suboptimality", "perplexity"),
                     title=settings_line(config))
    return [path, table, *plots]
