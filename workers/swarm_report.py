"""What the comparison adds for a decentralized method (SwarmSGD): its entry and its table notes.

What it owns: folding the workers' SwarmSGD summaries (workers/swarm_train.py) into the extra part
of their results.json entry (`decentralized`), and the line under the table that states it. What
it must never do: touch the other methods' entries (workers/report.py owns those).
"""

from __future__ import annotations

from typing import Any

__all__ = ["decentralized_entry", "footer_lines"]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def decentralized_entry(by_rank: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """What a decentralized run adds: the worst node, the spread, interactions, fallbacks, passes.

    `interactions_per_node` counts every averaging a node took part in (started or answered);
    `latency_ms` is the mean time from starting an interaction to having averaged; `data_passes`
    is the total of examples all nodes processed over the training set's size."""
    head = by_rank[0]
    swarm = [s.get("swarm", {}) for s in by_rank]
    seen = [s.get("examples_seen") for s in by_rank]
    sizes = [s.get("shard_size") for s in by_rank]
    worst = head.get("worst_node") or {}
    return {
        "worst_node_metric": worst.get(metric), "worst_node_rank": worst.get("rank"),
        "model_spread": head.get("model_spread"),
        "interactions_per_node": sum(int(s.get("interactions", 0)) for s in by_rank) / len(by_rank),
        "data_passes": (sum(seen) / sum(sizes)) if None not in seen + sizes and sum(sizes) else None,
        **{key: sum(int(w.get(key, 0)) for w in swarm)
           for key in ("fallbacks", "decode_failures", "bootstrap_full", "timeouts", "declined",
                       "expired", "malformed", "stale", "errors")},
        "dead_peers": sorted({p for w in swarm for p in w.get("dead_peers", [])}),
        "missing_ranks": head.get("missing_ranks", []),
        "latency_ms": 1e3 * sum(float(w.get("t_latency", 0.0)) for w in swarm)
                      / max(1, sum(int(w.get("interactions", 0)) for w in swarm)),
        "serve_s_per_step": sum(float(w.get("t_serve", 0.0)) / max(1, s["steps"])
                                for w, s in zip(swarm, by_rank)) / len(by_rank),
        "config": swarm[0].get("config"),
    }


def footer_lines(methods: dict[str, dict[str, Any]], metric: str) -> list[str]:
    """One line per decentralized method: worst node, spread, interactions, passes, failures."""
    pct = metric == "accuracy"
    lines = []
    for name, m in methods.items():
        d = m.get("decentralized")
        if not d:
            continue
        worst = d["worst_node_metric"]
        worst_text = _fmt(100 * worst if (pct and worst is not None) else worst, ".2f" if pct else ".4g")
        lines.append(
            f"{name}: {metric} of the average model (above); worst node {worst_text}"
            f"{'%' if pct else ''} (rank {d['worst_node_rank']}), model spread "
            f"{_fmt(d['model_spread'], '.3g')}, {d['interactions_per_node']:.0f} interactions "
            f"per node ({_fmt(d.get('latency_ms'), '.1f')} ms each), "
            f"{_fmt(d['data_passes'], '.1f')} data passes, {d['fallbacks']} full-copy "
            f"fallbacks, {d['timeouts']} timeouts, dead peers {d['dead_peers'] or 'none'}")
    return lines
