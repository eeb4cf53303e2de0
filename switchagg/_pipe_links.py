"""The worker's connections to a switch's dataplane pipes (`switch-emulator --pipes P`).

What it owns: one DEALER socket per pipe named in JOIN_OK, the PIPE_HELLO greeting on each, and
which socket a burst goes to (pipe p owns slots `packet.pipe_bounds(s, P)[p:p+2]`). What it must
never do: decide protocol rules (the stream machine does; it only cuts first-send bursts at the
range bounds so that each goes to one pipe), or be touched by any thread but the client's engine.

How it works: `PipeLinks` connects and greets every pipe at once; `wait_ready` waits (bounded) for
every PIPE_HELLO_OK, so no data leaves before a pipe knows the connection's rank. `route` maps a
burst to its pipe by its first packet's slot; a burst that straddles ranges (only resends can: they
are gathered by chunk order) is split by pipe, copies, as resends are anyway. Results come back on
the pipe sockets as split messages; the client's engine drains them like the main socket. With
CURVE each pipe socket is a CURVE client of the switch's public key, as the main socket is (the
pipes run with the switch's key pair).
"""

from __future__ import annotations

import time

import numpy as np
import zmq

from switchagg._curve import client_options
from switchagg.errors import JoinRejected, SwitchTimeout
from switchagg.packet import SLOT_MASK, pipe_bounds
from switchagg.protocol import (FRAME_CONTROL, Error, PipeHello, PipeHelloOk, decode_control,
                                encode_control)

__all__ = ["PipeLinks"]

#: The pipes' send queues: as deep as the main socket's (a window of bursts, many times over).
HWM = 100_000


def _reachable(endpoint: str, switch_address: str) -> str:
    """A pipe bound on every interface (0.0.0.0, *) is reached at the host we reach the switch."""
    if endpoint.startswith("tcp://"):
        host, port = endpoint[6:].rsplit(":", 1)
        if host in ("0.0.0.0", "*", "[::]", "::"):
            switch_host = switch_address[6:].rsplit(":", 1)[0]
            return f"tcp://{switch_host}:{port}"
    return endpoint


class PipeLinks:
    """Sockets to every pipe of one job, greeted as `rank`.

    Args:
        context: the client's ZeroMQ context.
        endpoints: JOIN_OK.pipes.
        switch_address: where the client reaches the switch (for pipes bound on every interface).
        job_id, rank, key: from JOIN_OK.
        slots: the job's slots (the ranges come from `packet.pipe_bounds`).
        server_key: the switch's CURVE public key (the pipes use the switch's key pair), or
            None for plain sockets.
    """

    def __init__(self, context: zmq.Context, endpoints, switch_address: str, job_id: int,
                 rank: int, key: str, slots: int, server_key: bytes | None = None) -> None:
        self.bounds = pipe_bounds(slots, len(endpoints))
        self.sockets: list[zmq.Socket] = []
        self.endpoints = [_reachable(e, switch_address) for e in endpoints]
        self._job_id, self._rank = job_id, rank
        hello = encode_control(PipeHello(job_id, rank, key))
        for endpoint in self.endpoints:
            sock = context.socket(zmq.DEALER)
            for option, value in ((zmq.SNDHWM, HWM), (zmq.RCVHWM, HWM), (zmq.LINGER, 0)):
                sock.setsockopt(option, value)
            if server_key is not None:
                client_options(sock, server_key)
            sock.connect(endpoint)
            sock.send_multipart([FRAME_CONTROL, hello])
            self.sockets.append(sock)

    def wait_ready(self, deadline: float) -> None:
        """Wait for every pipe's PIPE_HELLO_OK.

        Raises:
            JoinRejected: a pipe refused the greeting.
            SwitchTimeout: a pipe did not answer before `deadline` (time.monotonic()).
        """
        for p, sock in enumerate(self.sockets):
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                    raise SwitchTimeout(f"dataplane pipe {p} at {self.endpoints[p]} did not "
                                        f"accept rank {self._rank}; is it reachable from here?",
                                        rank=self._rank)
                frames = sock.recv_multipart()
                if len(frames) != 2 or frames[0] != FRAME_CONTROL:
                    continue
                message = decode_control(frames[1])
                if isinstance(message, PipeHelloOk):
                    break
                if isinstance(message, Error):
                    raise JoinRejected(f"dataplane pipe {p} refused rank {self._rank}: "
                                       f"{message.message}", field=message.field)

    def route(self, heads: np.ndarray, vals: np.ndarray):
        """[(socket, heads, vals)] for one burst: its pipe's, or split by pipe."""
        slot = heads[:, 2] & SLOT_MASK
        pipe = np.searchsorted(self.bounds, slot, side="right") - 1
        first = int(pipe[0])
        if (pipe == first).all():
            return [(self.sockets[first], heads, vals)]
        return [(self.sockets[p], heads[pipe == p], vals[pipe == p]) for p in np.unique(pipe)]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets = []
