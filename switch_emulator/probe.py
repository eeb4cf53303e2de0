"""Health probe: is a switch answering at this address? (`switch-emulator --probe ENDPOINT`)

What it owns: one round trip of the control plane, STATS -> STATS_REPLY, from a fresh DEALER socket,
and the exit status a container healthcheck or a launch script reads (0 healthy, 1 not). What it must
never do: join a job, send data, or wait past its timeout (a healthcheck that hangs is worse than one
that fails: the orchestrator's own timeout would hide the reason).

How it works: connect, send `StatsRequest(summary=True)` (switch-wide counters only, so no job needs
to exist and the reply stays small whatever the number of jobs), poll for
one reply until the deadline, decode it with the shared protocol module. A switch that is still
binding, not listening, or busy past the timeout reads as unhealthy, which is what `depends_on:
condition: service_healthy` in docker/compose.yaml needs: workers start only once JOIN can be
answered. The socket lingers 0 ms, so an unanswered request does not keep the process alive.
"""

from __future__ import annotations

import zmq

from switchagg.errors import ProtocolError, SwitchTimeout
from switchagg.protocol import FRAME_CONTROL, MAX_REPLY_BYTES, StatsReply, StatsRequest, decode_control, encode_control

__all__ = ["PROBE_TIMEOUT_S", "probe", "main"]

#: Seconds the probe waits for STATS_REPLY. The switch answers control messages between bursts
#: within one poll interval (server.POLL_MS = 100 ms) plus one MAX_BATCH of bursts; 2 s leaves room
#: on a loaded host and stays under docker/compose.yaml's healthcheck timeout (5 s).
PROBE_TIMEOUT_S = 2.0


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S,
          context: zmq.Context | None = None, server_key: str | None = None) -> dict:
    """Ask the switch at `endpoint` for its counters.

    Args:
        endpoint: the switch's address, e.g. tcp://127.0.0.1:5555.
        timeout: seconds to wait for the reply.
        context: ZeroMQ context to use (default: the process's shared instance).
        server_key: the switch's CURVE public key (z85) or key file, if it runs with CURVE.

    Returns:
        The switch-wide counters of the STATS_REPLY.

    Raises:
        SwitchTimeout: no reply within `timeout` (no switch there, or it is stuck).
        ProtocolError: something answered, but not with STATS_REPLY (not a switch, or a different
            protocol version).
        zmq.ZMQError: the endpoint is malformed.
    """
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if server_key:
            from switch_emulator._keys import probe_options
            probe_options(sock, server_key)
        sock.connect(endpoint)
        sock.send_multipart([FRAME_CONTROL, encode_control(StatsRequest(summary=True))])
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise SwitchTimeout(f"no answer from a switch at {endpoint} within {timeout:g} s: is "
                                "switch-emulator running and bound to an address reachable from here?")
        frames = sock.recv_multipart()
    finally:
        sock.close(linger=0)
    if len(frames) != 2 or frames[0] != FRAME_CONTROL:
        raise ProtocolError(f"{endpoint} answered with {len(frames)} frames, not a control message; "
                            "is it a switch-emulator of this version?", field="frames")
    reply = decode_control(frames[1], MAX_REPLY_BYTES)
    if not isinstance(reply, StatsReply):
        raise ProtocolError(f"{endpoint} answered {reply.TYPE} to STATS", field="type",
                            value=reply.TYPE)
    return reply.stats


def main(endpoint: str, timeout: float = PROBE_TIMEOUT_S, server_key: str | None = None) -> int:
    """Probe and report on one line; returns 0 if a switch answered, 1 otherwise."""
    try:
        stats = probe(endpoint, timeout, server_key=server_key)
    except (SwitchTimeout, ProtocolError, zmq.ZMQError, ValueError) as exc:
        print(f"switch-emulator --probe {endpoint}: unhealthy: {exc}", flush=True)
        return 1
    print(f"switch-emulator --probe {endpoint}: healthy ({stats.get('jobs_active', 0)} job(s), "
          f"{stats.get('slots_free', 0)} of {stats.get('slots_total', 0)} slots free, incarnation "
          f"{stats.get('incarnation', '?')})", flush=True)
    return 0
