"""SwarmSGD: decentralized, asynchronous training with local steps and quantized pairwise averaging.

SwarmSGD (Nadiradze, Sabour, Davies, Li, Alistarh, NeurIPS 2021) has no switch, no all-reduce and
no global round. Every worker takes H local SGD steps on its own model, then averages it with one
neighbour drawn at random from a regular graph: the pair exchange their models and both move to
the average. Models travel on a cubic lattice mod q (b bits per coordinate, no norm), each side
decoding the other's model with its own as the reference.

It is the one method that owns its training loop (workers/swarm_train.py): it is not a codec and
uses no collective. Its parts, each with no knowledge of training:

| module       | owns                                                             | I/O      |
|--------------|------------------------------------------------------------------|----------|
| `lattice`    | the mod-q lattice quantizer and its decode check                 | none     |
| `graph`      | the interaction graph (complete, ring, random regular)          | none     |
| `wire`       | the peer messages: one fixed header and one payload, validated   | none     |
| `settings`   | a node's validated settings and its counters                     | none     |
| `node`       | a worker's peer socket, its answering thread, the interaction    | ZeroMQ   |

Start with `node.SwarmNode`: its essay walks one interaction from request to averaged models.
"""

from __future__ import annotations

__all__ = ["graph", "lattice", "node", "settings", "wire"]
