"""The source papers' claims, each measured from `switchagg reproduce`'s runs, and the report.

What it owns: the list of claims (`CLAIMS`: who claims it, what, the paper's own figure where it
gives one), the measurement and verdict of each from the runs' merged results, and the files
`report.md`, `claims.json` and the claims' PNGs. What it must never do: run anything (the runs are
`workers/reproduce.py`'s) or invent a paper figure: where the paper's number is not quoted in the
sources this project works from, the report says so.

Verdicts: "holds", "does not hold", "not run" (its runs were skipped or failed: the reason is
given), "not in this build" (a method another issue adds), "not measurable" (what it needs does
not exist yet).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Callable

__all__ = ["CLAIMS", "evaluate", "write_report"]

Results = dict[str, list[dict[str, Any]]]   # run name -> one entry per seed (reproduce.run_one)


def _ok(entries: list[dict]) -> list[dict]:
    return [e for e in entries if not e.get("error")]


def _method(results: Results, run: str, method: str, key: str) -> list[float]:
    """One number of one method over the run's seeds (those that ran it)."""
    out = []
    for e in _ok(results.get(run, [])):
        m = e["methods"].get(method)
        if m is not None and m.get(key) is not None:
            out.append(float(m[key]))
    return out


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _spread(xs: list[float], scale: float = 1.0, spec: str = ".2f") -> str:
    if not xs:
        return "-"
    text = format(_mean(xs) * scale, spec)
    return text if len(xs) == 1 else f"{text} ({format(min(xs) * scale, spec)}-" \
                                      f"{format(max(xs) * scale, spec)}, {len(xs)} seeds)"


def _missing(results: Results, runs: tuple[str, ...], notes: list[str]) -> str | None:
    """Why none of the runs has a result, or None."""
    if any(_ok(results.get(r, [])) for r in runs):
        return None
    why = [n for n in notes if n.split(":")[0] in runs]
    failed = [f"{r}: {e['error'].splitlines()[0]}" for r in runs for e in results.get(r, [])
              if e.get("error")]
    return "; ".join(why + failed) or f"{', '.join(runs)} not in this set (--quick?)"


def _series_max(results: Results, run: str, method: str, key: str, lo: float, hi: float) -> float:
    """Max of a per-step value over steps in [lo, hi) of the run (fractions of its steps), seeds
    pooled (rank 0's series)."""
    best = math.nan
    for e in _ok(results.get(run, [])):
        steps = e["series"].get(method) or []
        n = len(steps)
        a = max(1, int(lo * n))      # never step 0: its scale is the first-step rule's
        window = steps[a:max(int(hi * n), a + 1)]
        vals = [float(s[key]) for s in window if s.get(key) is not None]
        if vals:
            best = max(vals) if math.isnan(best) else max(best, max(vals))
    return best


def _steady_rounds(results: Results, run: str, method: str) -> list[float]:
    """Rounds per step from step 1 on (step 0 of IntSGD is the first-step rule's), per seed."""
    out = []
    for e in _ok(results.get(run, [])):
        steps = [s for s in e["series"].get(method) or [] if s["step"] >= 1]
        if steps:
            out.append(_mean([float(s.get("rounds") or 0) for s in steps]))
    return out


# --- the claims --------------------------------------------------------------------------------

def accuracy(results: Results, notes: list[str]) -> dict:
    runs = ("digits-4", "digits-16-int8", "fmnist-fc-4", "fmnist-lenet-4")
    why = _missing(results, runs, notes)
    if why:
        return {"verdict": "not run", "measured": why}
    parts, worst = [], math.inf
    for run in runs:
        sgd = _method(results, run, "sgd", "final_accuracy")
        ints = _method(results, run, "intsgd-random", "final_accuracy")
        if sgd and ints:
            gap = 100 * (_mean(ints) - _mean(sgd))
            worst = min(worst, gap)
            parts.append(f"{run}: IntSGD {_spread(ints, 100)}% vs SGD {_spread(sgd, 100)}% "
                         f"({gap:+.2f} points)")
    return {"verdict": "holds" if worst >= -1.0 else "does not hold",
            "measured": "; ".join(parts), "worst_gap_points": worst,
            "rule": "holds when IntSGD's mean test accuracy is within 1 point of SGD's on every "
                    "run"}


def heuristic_round(results: Results, notes: list[str]) -> dict:
    runs = ("digits-4", "fmnist-lenet-4", "fmnist-fc-4")
    why = _missing(results, runs, notes)
    if why:
        return {"verdict": "not run", "measured": why}
    parts, ratios = [], []
    for run in runs:
        h = _steady_rounds(results, run, "heuristic-switchml")
        i = _steady_rounds(results, run, "intsgd-random")
        if not (h and i):
            continue
        ratios.append(_mean(h) / _mean(i))
        t_h = [e["methods"]["heuristic-switchml"]["time_per_step"] for e in _ok(results[run])]
        t_i = [e["methods"]["intsgd-random"]["time_per_step"] for e in _ok(results[run])]
        step = lambda ts: _mean([1e3 * (t["backward"] + t["update"]) for t in ts])  # noqa: E731
        comm = lambda ts: _mean([1e3 * t["communicate"] for t in ts])  # noqa: E731
        pk_h = _mean(_method(results, run, "heuristic-switchml", "packets"))
        pk_i = _mean(_method(results, run, "intsgd-random", "packets"))
        parts.append(f"{run}: {_mean(h):.1f} vs {_mean(i):.1f} rounds per step from step 1, "
                     f"{pk_h / pk_i:.2f}x the packets, {step(t_h):.1f} vs {step(t_i):.1f} ms per "
                     f"step ({step(t_h) - step(t_i):+.1f} ms; communication {comm(t_h):.1f} vs "
                     f"{comm(t_i):.1f} ms)")
    if not ratios:
        return {"verdict": "not run", "measured": "no run had both methods"}
    return {"verdict": "holds" if all(abs(r - 2.0) < 1e-9 for r in ratios) else "does not hold",
            "measured": "; ".join(parts),
            "rule": "holds when the heuristic takes exactly twice IntSGD's rounds per step "
                    "(from step 1: IntSGD's step 0 follows its first-step rule)"}


def diana_bounded(results: Results, notes: list[str]) -> dict:
    runs = ("logreg-a5a-4", "logreg-a5a-16")
    why = _missing(results, runs, notes)
    if why:
        return {"verdict": "not run", "measured": why}
    parts, holds = [], True
    for run in runs:
        if not _ok(results.get(run, [])):
            continue
        row = {}
        for m in ("intsgd-random", "intdiana"):
            row[m] = (_series_max(results, run, m, "max_abs_q", 0.02, 0.1),
                      _series_max(results, run, m, "max_abs_q", 0.9, 1.0))
        (s_early, s_late), (d_early, d_late) = row["intsgd-random"], row["intdiana"]
        grows = s_late >= 10 * max(s_early, 1)
        bounded = d_late <= 2 * max(d_early, 1) and d_late * 10 <= s_late
        holds &= grows and bounded
        parts.append(f"{run}: max |Q_i| early (2-10% of steps) -> late (last 10%): IntSGD "
                     f"{s_early:.0f} -> {s_late:.0f}, IntDIANA {d_early:.0f} -> {d_late:.0f}")
    return {"verdict": "holds" if holds else "does not hold", "measured": "; ".join(parts),
            "rule": "holds when IntSGD's late max |Q_i| is at least 10x its early one while "
                    "IntDIANA's stays within 2x of its early one and 10x below IntSGD's"}


def diana_converges(results: Results, notes: list[str]) -> dict:
    runs = ("logreg-a5a-4", "logreg-a5a-16")
    why = _missing(results, runs, notes)
    if why:
        return {"verdict": "not run", "measured": why}
    parts, holds = [], True
    for run in runs:
        dist = {m: [e["methods"][m]["evaluation"].get("dist2") for e in _ok(results.get(run, []))
                    if m in e["methods"]] for m in ("sgd", "intsgd-random", "intdiana")}
        dist = {m: [d for d in v if d is not None] for m, v in dist.items()}
        if not all(dist.values()):
            continue
        ratio = _mean(dist["intdiana"]) / _mean(dist["sgd"])
        holds &= ratio <= 10
        parts.append(f"{run}: ||x - x*||^2 SGD {_mean(dist['sgd']):.2e}, IntSGD "
                     f"{_mean(dist['intsgd-random']):.2e}, IntDIANA {_mean(dist['intdiana']):.2e} "
                     f"({ratio:.1f}x SGD's)")
    if not parts:
        return {"verdict": "not run", "measured": "no run had the three methods"}
    return {"verdict": "holds" if holds else "does not hold", "measured": "; ".join(parts),
            "rule": "holds when IntDIANA ends within 10x of full-precision GD's distance to x*"}


def _lanes(results: Results, run: str) -> int:
    """The lane width a run's switch jobs used (32 for results from before lanes existed)."""
    widths = {int(e["config"].get("lane_bits") or 32) for e in _ok(results.get(run, []))}
    return min(widths) if widths else 32


def _bytes_ratio(results: Results, run: str, method: str = "intsgd-random") -> str:
    """The byte ratios of a run: `method` against fp32 SGD of the same run, and its bits per
    coordinate against the int32-lane run digits-4 (same model and data)."""
    b_i = _mean(_method(results, run, method, "bytes_sent_per_worker"))
    b_s = _mean(_method(results, run, "sgd", "bytes_sent_per_worker"))
    c_i = _mean(_method(results, run, method, "bits_per_coord"))
    text = []
    if b_i == b_i and b_s == b_s and b_s:
        text.append(f"IntSGD sent {b_i / b_s:.3f}x SGD's fp32 bytes ({b_i / 1e6:.2f} vs "
                    f"{b_s / 1e6:.2f} MB per worker, packet headers included)")
    c_32 = _mean(_method(results, "digits-4", method, "bits_per_coord"))
    if c_i == c_i and c_32 == c_32 and c_32 and _lanes(results, "digits-4") == 32:
        text.append(f"{c_i:.2f} bits per coordinate against {c_32:.2f} in digits-4's int32 "
                    f"lanes ({c_i / c_32:.3f}x)")
    return "; ".join(text)


def int8_sufficient(results: Results, notes: list[str]) -> dict:
    run = "digits-16-int8"
    why = _missing(results, (run,), notes)
    if why:
        return {"verdict": "not run", "measured": why}
    lanes = _lanes(results, run)
    acc_i = _method(results, run, "intsgd-random", "final_accuracy")
    acc_s = _method(results, run, "sgd", "final_accuracy")
    clip = _method(results, run, "intsgd-random", "clip_fraction")
    wraps = _method(results, run, "intsgd-random", "wraps")
    q = _method(results, run, "intsgd-random", "max_abs_q_after_first_step")
    h_acc = _method(results, run, "heuristic-switchml", "final_accuracy")
    gap = 100 * (_mean(acc_i) - _mean(acc_s))
    holds = max(wraps, default=1) == 0 and gap >= -1.0
    text = (f"16 workers, 8-bit budget (per-worker range [-8, 7]) in {lanes}-bit lanes: IntSGD "
            f"{_spread(acc_i, 100)}% vs SGD (fp32) {_spread(acc_s, 100)}% ({gap:+.2f} points); "
            f"clip fraction {_spread(clip, 100, '.3f')}%, wraps {int(max(wraps, default=0))} "
            f"(counted by the switch at the lane width), max |Q_i| from step 1 "
            f"{_spread(q, 1, '.0f')}")
    if h_acc:
        text += f"; the heuristic scaled into 8 bits: {_spread(h_acc, 100)}%"
    ratio = _bytes_ratio(results, run)
    if ratio:
        text += f"; bytes: {ratio}"
    return {"verdict": "holds" if holds else "does not hold", "measured": text,
            "rule": "holds when no packet wrapped and IntSGD is within 1 point of SGD",
            "lanes": f"{lanes}-bit lanes on the wire"}


def int8_bytes(results: Results, notes: list[str]) -> dict:
    run = "digits-16-int8"
    why = _missing(results, (run,), notes)
    if why:
        return {"verdict": "not run", "measured": why}
    lanes = _lanes(results, run)
    if lanes != 8:
        return {"verdict": "not measurable",
                "measured": f"{run} ran in {lanes}-bit lanes (results from before 8-bit lanes)"}
    bits = _mean(_method(results, run, "intsgd-random", "bits_per_coord"))
    # A packet of k = 64 one-byte lanes has a 16-byte header: 2 bits per coordinate on top.
    payload = bits - 8 * 16 / 64
    holds = payload <= 8 * 1.1
    return {"verdict": "holds" if holds else "does not hold",
            "measured": f"{run}, 8-bit lanes: {_bytes_ratio(results, run)}; less the headers' "
                        f"2 bits, {payload:.2f} bits of payload per coordinate (the first step's "
                        f"exponent round and last chunks' padding included)",
            "rule": "holds when IntSGD's bits per coordinate, less the packet headers' share, "
                    "are within 10% of 8"}


def baseline(method: str, what: str) -> Callable[[Results, list[str]], dict]:
    """A hook for a baseline's claim: measured once the method is registered (full set)."""
    def measure(results: Results, notes: list[str]) -> dict:
        from switchagg.methods import METHODS, OWN_LOOP
        if method not in METHODS and method not in OWN_LOOP:
            return {"verdict": "not in this build", "measured": f"{method} is not registered"}
        parts = []
        for run in ("digits-4", "fmnist-fc-4"):
            acc = _method(results, run, method, "final_accuracy")
            sgd = _method(results, run, "sgd", "final_accuracy")
            b = _method(results, run, method, "bytes_sent_per_worker")
            b_s = _method(results, run, "sgd", "bytes_sent_per_worker")
            if acc and sgd and b and b_s:
                sync = _method(results, run, method, "sync_fraction")
                parts.append(f"{run}: {_spread(acc, 100)}% vs SGD {_spread(sgd, 100)}%, "
                             f"{_mean(b_s) / _mean(b):.1f}x fewer bytes than fp32"
                             + (f", sync {_spread(sync, 100, '.1f')}%" if sync else ""))
        if not parts:
            return {"verdict": "not run", "measured": f"no run included {method}"}
        return {"verdict": "measured", "measured": "; ".join(parts), "what": what}
    return measure


#: id -> (source, claim, the paper's own figure, measure)
CLAIMS: list[tuple[str, str, str, str, Callable[[Results, list[str]], dict]]] = [
    ("intsgd-accuracy", "IntSGD (Mishchenko et al., ICLR 2022)",
     "IntSGD trains to the accuracy of full-precision SGD",
     "ResNet18/CIFAR-10 and LSTM/WikiText-2 close to SGD (its Table 2; the figures are not "
     "quoted in the sources this project works from)", accuracy),
    ("heuristic-extra-round", "SwitchML (Sapio et al., NSDI 2021); IntSGD",
     "SwitchML's heuristic scaling needs a second round per reduction (the exponents), which "
     "IntSGD's floatless alpha avoids",
     "two rounds of communication (FPISA's summary of SwitchML); no time figure quoted",
     heuristic_round),
    ("intdiana-bounded", "IntSGD, arXiv v1 abstract",
     "on heterogeneous data IntSGD's integers grow without bound, IntDIANA's stay bounded",
     "stated, no figure (the authors' 'max integer' plot is commented out)", diana_bounded),
    ("intdiana-converges", "IntSGD (Algorithm 3, logistic regression on a5a)",
     "IntDIANA converges to the optimum on heterogeneous shards",
     "plots of ||x - x*||^2 vs transmitted data (no number quoted)", diana_converges),
    ("int8-16-workers", "IntSGD (the authors' scripts: int8 all-reduce with clipping, 16 GPUs)",
     "8-bit integers suffice at 16 workers (each worker clipped to [-8, 7])",
     "int8 + clipping in every deep-learning run (no clip statistics quoted)", int8_sufficient),
    ("int8-bytes", "IntSGD", "int8 all-reduce sends a quarter of fp32's bytes",
     "8 bits against 32 per coordinate", int8_bytes),
    ("isgq-compression", "ISGQ", "ISGQ's compression gain at SGD's accuracy",
     "not quoted here", baseline("isgq-mse", "compression gain and accuracy")),
    ("qsgd-natsgd-gather", "IntSGD (baselines)",
     "QSGD and NatSGD need an all-gather, which costs more than an all-reduce",
     "not quoted here", baseline("qsgd-8bit", "accuracy and bytes through all-gather")),
    ("powersgd-volume", "IntSGD (baselines)", "PowerSGD+EF has the lowest communication volume",
     "not quoted here", baseline("powersgd", "accuracy and bytes")),
    ("swarmsgd-sync", "SwarmSGD", "SwarmSGD synchronizes a fraction of the steps",
     "not quoted here", baseline("swarmsgd", "synchronization fraction")),
]


def evaluate(results: Results, *, quick: bool, notes: list[str], wall_s: float) -> dict:
    """claims.json's content: every claim measured, the runs' results, the notes."""
    claims = []
    for cid, source, claim, paper, measure in CLAIMS:
        try:
            got = measure(results, notes)
        except Exception as exc:  # a claim's bug must not lose the others
            got = {"verdict": "not run",
                   "measured": f"measuring failed: {type(exc).__name__}: {exc}"}
        claims.append({"id": cid, "source": source, "claim": claim, "paper": paper, **got})
    return {"quick": quick, "wall_s": wall_s, "notes": notes, "claims": claims,
            "runs": {name: [{k: v for k, v in e.items() if k != "series"} for e in entries]
                     for name, entries in results.items()}}


def _plot_integers(out: str, results: Results) -> list[str]:
    """int_ranges.png: max |Q_i| per step of IntSGD and IntDIANA on heterogeneous logreg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for run in ("logreg-a5a-4", "logreg-a5a-16"):
        entries = _ok(results.get(run, []))
        if not entries:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in ("intsgd-random", "intdiana", "heuristic-switchml"):
            steps = entries[0]["series"].get(m)
            if steps:
                ax.plot([s["step"] for s in steps], [max(1, s["max_abs_q"] or 0) for s in steps],
                        label=f"{m} max|Q_i|")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("integer magnitude (rank 0)")
        ax.set_title(f"{run}, seed {entries[0]['config'].get('seed')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out, f"int_ranges_{run}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(os.path.basename(path))
    return written


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_report(out: str, content: dict, results: Results) -> None:
    """report.md, claims.json and the claims' PNGs in `out` (results: the runs, with series)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "claims.json"), "w") as f:
        json.dump(_clean(content), f, indent=1, default=str)
        f.write("\n")
    plots = _plot_integers(out, results)
    lines = [f"# The papers' claims, measured ({'quick' if content['quick'] else 'full'} set)", "",
             f"Wall time {content['wall_s'] / 60:.1f} min. Each run is one `switchagg compare` "
             f"(a switch and N worker processes on loopback); folders under `runs/`.", ""]
    for note in content["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "| claim | source | paper's figure | measured | verdict |",
              "|---|---|---|---|---|"]
    for c in content["claims"]:
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {cell(c['claim'])} | {cell(c['source'])} | {cell(c['paper'])} | "
                     f"{cell(c['measured'])} | **{c['verdict']}** |")
    lines += ["", "Rules behind the verdicts:", ""]
    lines += [f"- {c['id']}: {c['rule']}" for c in content["claims"] if c.get("rule")]
    lines += ["", "## Runs", ""]
    for name, entries in content["runs"].items():
        for e in entries:
            state = f"failed: {e['error']}" if e.get("error") else \
                f"{e['config'].get('wall_s', 0):.0f} s, table in `{e['folder']}/table.txt`"
            lines.append(f"- {name}, seed {e['config'].get('seed')}: {state}")
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
