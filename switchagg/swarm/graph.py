"""The interaction graph: who may average with whom.

What it owns: the neighbour lists of SwarmSGD's r-regular interaction graph, built identically on
every worker from (kind, n, degree, seed). What it must never do: any I/O, or depend on anything
but its arguments (every worker must get the same graph without talking).

How it works:
- `complete`: everyone else (degree n - 1), the default and the setting of the PopSGD code.
- `ring`: the two workers next to you (degree 2; 1 for n = 2).
- `regular`: a random connected simple graph in which every worker has `degree` neighbours,
  drawn by the configuration model (pair up n*degree half-edges at random, reject loops,
  multi-edges and disconnected draws, try again) from a generator seeded with `seed`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "neighbours"]

KINDS = ("complete", "ring", "regular")

#: Configuration-model draws before giving up; for n <= 1000 and small degrees the acceptance rate
#: is about exp(-(r^2 - 1)/4) (Bender-Canfield), i.e. > 1% up to r = 4, so 10k tries is ample.
_MAX_TRIES = 10_000


def neighbours(kind: str, n: int, *, degree: int | None = None, seed: int = 0) -> list[tuple[int, ...]]:
    """Each worker's neighbours, sorted: `result[i]` are the workers i may interact with.

    Args:
        kind: one of KINDS.
        n: number of workers (>= 1).
        degree: neighbours per worker, for `regular` only (1 <= degree < n, n*degree even).
        seed: fixes the `regular` draw (the same on every worker).
    Raises:
        ValueError: unknown kind, or a degree that no connected regular graph on n nodes has.
    """
    if n < 1:
        raise ValueError(f"a graph needs at least one worker, got n={n}")
    if kind == "complete":
        return [tuple(j for j in range(n) if j != i) for i in range(n)]
    if kind == "ring":
        return [tuple(sorted({(i - 1) % n, (i + 1) % n} - {i})) for i in range(n)]
    if kind != "regular":
        raise ValueError(f"unknown graph {kind!r}; choose one of {', '.join(KINDS)}")
    if degree is None or not 1 <= degree < n or (n * degree) % 2 or (degree == 1 and n > 2):
        raise ValueError(f"no connected {degree}-regular graph on {n} workers: need "
                         f"1 <= degree < n, n*degree even, and degree >= 2 beyond 2 workers")
    rng = np.random.default_rng(seed)
    stubs = np.repeat(np.arange(n), degree)
    for _ in range(_MAX_TRIES):
        pairs = rng.permutation(stubs).reshape(-1, 2)
        if np.any(pairs[:, 0] == pairs[:, 1]):
            continue
        edges = {tuple(sorted(p)) for p in pairs.tolist()}
        if len(edges) < len(pairs):
            continue
        adj: list[set[int]] = [set() for _ in range(n)]
        for a, b in edges:
            adj[a].add(b)
            adj[b].add(a)
        if _connected(adj):
            return [tuple(sorted(a)) for a in adj]
    raise ValueError(f"could not draw a connected {degree}-regular graph on {n} workers in "
                     f"{_MAX_TRIES} tries; use a smaller degree or the complete graph")


def _connected(adj: list[set[int]]) -> bool:
    seen, todo = {0}, [0]
    while todo:
        for j in adj[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == len(adj)
