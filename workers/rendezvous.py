"""`switchagg rendezvous`: ranks and a torch.distributed store for workers that start as replicas.

What it owns: the one thing replicas of a compose service lack to run torch.distributed (`sgd` and
every method that is not summed in the switch): a rank known before the first collective, and a
store to meet at. The rendezvous service holds a `torch.distributed.TCPStore`; each worker
connects, takes the next rank (an atomic counter in the store) and builds its process group on
the same store; the switch then sees the same ranks (each worker joins with its own). When every
worker has reported back (done or failed), the service exits 0 if all succeeded, else 1, so
`docker compose up --exit-code-from rendezvous` ends with the run and tells how it went (a worker
that reported waits for the rendezvous to exit first: the first container to exit ends the run). What it
must never do: run training, talk to the switch, or wait past its `--timeout`.

Keys (all under "switchagg/"): `rank` (the counter), `done` and `failed` (counters of workers
that finished), and `pg/...` (the process group's own keys).
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import time
from typing import Any

__all__ = ["configure", "main", "join", "report", "serve"]

_PREFIX = "switchagg/"


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `switchagg rendezvous`."""
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    parser.add_argument("--port", type=int, default=29500, help="TCP port of the store")
    parser.add_argument("--world-size", type=int, required=True, help="workers expected")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds to wait for every worker to report back before failing")


def _parse(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix("tcp://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rendezvous address {address!r}: expected HOST:PORT")
    return host, int(port)


def join(address: str, world_size: int, timeout: float) -> tuple[Any, int]:
    """Connect to the rendezvous at HOST:PORT and take a rank; returns (store, rank).

    Raises:
        RuntimeError: no rendezvous answered within `timeout`, or every rank is taken.
    """
    from torch.distributed import TCPStore
    host, port = _parse(address)
    try:
        store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, OSError) as exc:
        raise RuntimeError(f"no rendezvous answered at {host}:{port} within {timeout:g} s ({exc}); "
                           "check that `switchagg rendezvous` runs there") from None
    rank = int(store.add(_PREFIX + "rank", 1)) - 1
    if rank >= world_size:
        raise RuntimeError(f"rendezvous {host}:{port}: {rank + 1} workers joined a run of "
                           f"{world_size}; start exactly --world-size workers")
    return store, rank


def process_group_store(store: Any) -> Any:
    """The store a worker's process group uses (its keys apart from the rendezvous' own)."""
    from torch.distributed import PrefixStore
    return PrefixStore(_PREFIX + "pg", store)


def report(store: Any, ok: bool, address: str, linger: float = 30.0) -> None:
    """Tell the rendezvous at `address` this worker finished (ok) or failed, then wait for it to go.

    The worker exits only after the rendezvous has (or after `linger` seconds): under
    `docker compose up --exit-code-from rendezvous` the first container to exit stops the others,
    so the rendezvous must be that container, once every worker has reported. The wait probes
    the port with plain connections (the store's own socket would log a C++ warning when the
    server goes).
    """
    store.add(_PREFIX + ("done" if ok else "failed"), 1)
    host, port = _parse(address)
    deadline = time.monotonic() + linger
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError:  # refused or unresolvable: the rendezvous is gone
            return
        time.sleep(0.2)


def serve(host: str, port: int, world_size: int, timeout: float) -> int:
    """Hold the store until every worker reported; returns 0 (all done) or 1."""
    from torch.distributed import TCPStore
    store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=timeout))
    print(f"switchagg rendezvous: {host}:{port}, waiting for {world_size} workers", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, failed = (int(store.add(_PREFIX + k, 0)) for k in ("done", "failed"))
        if done + failed >= world_size:
            print(f"switchagg rendezvous: {done} workers done, {failed} failed", flush=True)
            return 0 if failed == 0 else 1
        time.sleep(0.5)
    print(f"switchagg rendezvous: timed out after {timeout:g} s "
          f"({int(store.add(_PREFIX + 'rank', 0))} workers joined)", file=sys.stderr, flush=True)
    return 1


def main(args: argparse.Namespace) -> int:
    """Entry point of `switchagg rendezvous`."""
    if args.world_size < 1:
        print(f"switchagg rendezvous: error: --world-size {args.world_size}: expected >= 1",
              file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"switchagg rendezvous: error: --port {args.port}: expected [1, 65535]", file=sys.stderr)
        return 2
    return serve(args.host, args.port, args.world_size, args.timeout)
