"""One gossip-only SwarmSGD node in its own process, for the dead-peer test.

    python tests/swarm_gossip_worker.py RANK WORLD DIR INTERACTIONS

Publishes its address as DIR/addr.RANK, waits (bounded) for every peer's, then does INTERACTIONS
interaction turns, holding its model lock 5 ms per turn as a training step would. Then it stops
averaging, says DIR/done.RANK, keeps answering (declining) until every other live rank said
done or 10 s passed, and writes its stats and model to DIR/result.RANK.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from switchagg.swarm.graph import neighbours
from switchagg.swarm.node import NodeConfig, SwarmNode


def _wait_for(paths: list[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return []
        time.sleep(0.02)
    return [p for p in paths if not os.path.exists(p)]


def main() -> int:
    rank, world, folder, turns = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    d = 2000
    model = np.random.default_rng(rank).normal(size=d)

    def read():
        return model.copy()

    def add(delta):
        model[:] += delta

    config = NodeConfig(quant="lattice", timeout=1.0, dead_after=2)
    with SwarmNode(rank, world, neighbours("complete", world)[rank], read, add, numel=d,
                   job="gossip-test", config=config, seed=rank) as node:
        tmp = os.path.join(folder, f".addr.{rank}")
        with open(tmp, "w") as f:
            f.write(node.address)
        os.replace(tmp, os.path.join(folder, f"addr.{rank}"))
        if _wait_for([os.path.join(folder, f"addr.{r}") for r in range(world)], 30):
            return 3
        addresses = []
        for r in range(world):
            with open(os.path.join(folder, f"addr.{r}")) as f:
                addresses.append(f.read())
        node.connect(addresses)
        node.start()
        print("started", flush=True)
        outcomes: dict[str, int] = {}
        t0 = time.monotonic()
        for _ in range(turns):
            with node.lock:
                time.sleep(0.005)
            outcome = node.interact()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        elapsed = time.monotonic() - t0
        node.finish()
        open(os.path.join(folder, f"done.{rank}"), "w").close()
        others = [r for r in range(world) if r != rank and r not in node.stats.dead_peers]
        _wait_for([os.path.join(folder, f"done.{r}") for r in others], 10)
        result = {"rank": rank, "elapsed": elapsed, "outcomes": outcomes,
                  "stats": node.stats.as_dict(), "model": model.tolist()}
    with open(os.path.join(folder, f"result.{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
