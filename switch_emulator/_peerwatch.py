"""Which members' connections closed: ZeroMQ's disconnect events, mapped to routing identities.

What it owns: the ROUTER's monitor socket, the file descriptor each member's messages came from,
and the members suspected gone since their connection's descriptor was reported disconnected.
What it must never do: decide anything about jobs (the server asks `ControlPlane.peer_gone`),
send on the ROUTER (the server probes), or block.

Why: a worker that dies without LEAVE (SIGKILL, a crash, a torchrun teardown) closes its TCP
connection at once, but a ROUTER tells nobody: the switch would learn only from its next send to
that peer, or from the liveness timeout, and until then the job's name and slots stay taken.
ZeroMQ's ROUTER_NOTIFY (an empty message per disconnected identity) would say it directly, but it
is a draft option that released libzmq builds (4.3.x here) refuse with EINVAL. So this uses the
stable API: a socket monitor reports DISCONNECTED with the connection's descriptor, and each
member's control messages carry theirs (ZMQ_SRCFD), so a disconnect names its identities.

How it works: `seen` records a member's descriptor (its heartbeats keep it current after a
reconnect). `drain` reads the monitor's events and makes the identities on each disconnected
descriptor suspects. A descriptor number is reused by the next connection, and a worker whose
TCP connection was reset comes back under its identity (ROUTER_HANDOVER, within ZeroMQ's 0.1 s
reconnect interval), so a suspect is only a suspect: `due` hands it to the server
`DISCONNECT_GRACE_S` later, which probes it with a harmless HEARTBEAT_ACK (ROUTER_MANDATORY: the
send fails with EHOSTUNREACH when no connection holds the identity) and aborts its job only if the
probe found it gone. Where the descriptor is unknown (SRCFD unsupported, a transport without one),
every member so recorded is a suspect on every disconnect: more probes, the same verdicts.
"""

from __future__ import annotations

import struct

import zmq

__all__ = ["PeerWatch", "DISCONNECT_GRACE_S"]

#: A suspect is probed this long after its disconnect: a TCP reset reconnects within ZeroMQ's
#: 0.1 s reconnect interval, and messages it sent before closing (its LEAVE) are read by then.
DISCONNECT_GRACE_S = 0.5
#: Monitor events read per `drain` (the rest wait for the next one).
MAX_EVENTS = 4096
_UNKNOWN = -1


class PeerWatch:
    """Disconnect events of one ROUTER socket, as suspected member identities.

    Args:
        router: the switch's ROUTER socket (its monitor is created on the same context).
    """

    def __init__(self, router: zmq.Socket) -> None:
        self._router = router
        self.events = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_of: dict[bytes, int] = {}
        self._by_fd: dict[int, set[bytes]] = {}
        self.suspects: dict[bytes, float] = {}  # identity -> when its connection closed
        self.disconnects = 0                    # DISCONNECTED events read

    def seen(self, identity: bytes, frame: zmq.Frame) -> None:
        """A member's message arrived in `frame`: remember the descriptor it came from."""
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            fd = _UNKNOWN
        if fd < 0:
            fd = _UNKNOWN
        old = self._fd_of.get(identity)
        if old == fd:
            return
        if old is not None:
            self._unmap(identity, old)
        self._fd_of[identity] = fd
        self._by_fd.setdefault(fd, set()).add(identity)

    def forget(self, identity: bytes) -> None:
        """`identity` is no longer a member: stop watching it."""
        fd = self._fd_of.pop(identity, None)
        if fd is not None:
            self._unmap(identity, fd)
        self.suspects.pop(identity, None)

    def watched(self) -> list[bytes]:
        return list(self._fd_of)

    def drain(self, now: float) -> None:
        """Read the monitor's pending events; the identities on a disconnected descriptor (and
        those whose descriptor is unknown) become suspects as of `now`."""
        for _ in range(MAX_EVENTS):
            try:
                parts = self.events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) < 1 or len(parts[0]) < 6:
                continue
            event, fd = struct.unpack("=hi", parts[0][:6])
            if event != zmq.EVENT_DISCONNECTED:
                continue
            self.disconnects += 1
            for identity in self._by_fd.pop(fd, set()) if fd != _UNKNOWN else ():
                del self._fd_of[identity]  # its next message records its new descriptor
                self.suspects.setdefault(identity, now)
            for identity in self._by_fd.get(_UNKNOWN, ()):
                self.suspects.setdefault(identity, now)

    def due(self, now: float) -> list[bytes]:
        """Suspects whose grace has passed: the caller probes each and calls `cleared` or
        `forget` (gone)."""
        return [i for i, since in self.suspects.items() if now - since >= DISCONNECT_GRACE_S]

    def cleared(self, identity: bytes) -> None:
        """The probe reached `identity`: it is connected (it reconnected, or another connection
        had reused the descriptor)."""
        self.suspects.pop(identity, None)

    def close(self) -> None:
        try:
            self._router.disable_monitor()
        except zmq.ZMQError:
            pass
        self.events.close(linger=0)

    def _unmap(self, identity: bytes, fd: int) -> None:
        holders = self._by_fd.get(fd)
        if holders is not None:
            holders.discard(identity)
            if not holders:
                del self._by_fd[fd]
