"""A fake link: N sans-IO client machines and one switch dataplane, joined in memory.

What it owns: a discrete-event network for tests (like h11's tests/helpers.py, which pairs a client
and a server): seeded packet loss, duplication and reordering in both directions, a fixed latency,
and a fake clock that jumps to the next delivery or to the next retransmission timer. What it must
never do: open a socket or read a real clock. The switch side validates each frame as the real one
does (`packet.validate_burst` with kind=DATA and the sender's rank) and hands the good packets to
the dataplane; results are multicast to every client and RESULT_RETX unicast to the sender.

Frames are copied to bytes when sent, as a socket would: a ring entry a machine later rewrites can
never change a frame already "on the wire". Reordering permutes packets inside a frame and delays
whole frames by less than the minimum RTO (a frame held longer than a retransmission timeout could
deliver a stale duplicate after its slot moved on, which SwitchML's protocol, like ours, excludes).
"""

from __future__ import annotations

import heapq

import numpy as np

from switch_emulator._golden import GoldenDataplane
from switchagg._stream import FillFn, StreamCall, StreamMachine, array_fill, pack_lanes
from switchagg.packet import Kind, parse_burst, validate_burst

__all__ = ["FakeNetwork", "dataplane_factories"]

JOB_ID = 7


def dataplane_factories() -> dict[str, object]:
    """Dataplanes to run the tests over: the golden model, and the fast one where it exists."""
    factories = {"golden": GoldenDataplane}
    try:
        from switch_emulator.dataplane import make_dataplane
    except ImportError:
        return factories
    factories["fast"] = lambda n, s, k, lane_bits=32: make_dataplane("fast", n, s, k,
                                                                     lane_bits=lane_bits)
    return factories


class FakeNetwork:
    """N clients and one dataplane with an impaired link between them.

    Args:
        world_size, k, slots, burst: the job.
        dataplane: factory (world_size, slots, k) -> dataplane.
        drop, duplicate, reorder: per-packet probabilities (each direction, each receiver).
        seed: seeds every impairment.
        latency: one-way delay of a frame, fake seconds.
        rto_min: the clients' minimum RTO; reordering delays stay below it.
        lane_bits: the job's lane width (8, 16 or 32).
    """

    def __init__(self, world_size: int, *, k: int = 8, slots: int = 16, burst: int = 4,
                 dataplane=GoldenDataplane, drop: float = 0.0, duplicate: float = 0.0,
                 reorder: float = 0.0, seed: int = 0, latency: float = 0.001,
                 rto_min: float = 0.01, lane_bits: int = 32) -> None:
        self.k, self.slots, self.lane_bits = k, slots, lane_bits
        self.clients = [StreamMachine(job_id=JOB_ID, rank=r, k=k, slots=slots, burst=burst,
                                      rto_initial=0.05, rto_min=rto_min, rto_max=1.0,
                                      lane_bits=lane_bits)
                        for r in range(world_size)]
        wide = {} if lane_bits == 32 else {"lane_bits": lane_bits}
        self.switch = dataplane(world_size, slots, k, **wide)
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.rng = np.random.default_rng(seed)
        self.latency, self.max_jitter = latency, rto_min / 2
        self.now = 0.0
        self._events: list = []  # (time, seq, "up"|"down", rank, bytes)
        self._seq = 0
        self.frames_delivered = 0
        self.switch_rejected = 0

    # ---- the link ------------------------------------------------------------------------

    def _impair(self, packets: np.ndarray) -> np.ndarray:
        n = len(packets)
        keep = self.rng.random(n) >= self.drop
        order = np.flatnonzero(keep)
        dup = order[self.rng.random(len(order)) < self.duplicate]
        order = np.concatenate([order, dup])
        if self.reorder and self.rng.random() < self.reorder:
            order = self.rng.permutation(order)
        return packets[order]

    def _post(self, direction: str, rank: int, packets: np.ndarray) -> None:
        packets = self._impair(packets)
        if not len(packets):
            return
        delay = self.latency
        if self.reorder and self.rng.random() < self.reorder:
            delay += self.rng.random() * self.max_jitter
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, direction, rank,
                                      packets.tobytes()))

    def _deliver(self, direction: str, rank: int, frame: bytes) -> list[StreamCall]:
        self.frames_delivered += 1
        if direction == "down":
            return self.clients[rank].receive(frame, self.now)
        packets, _ = parse_burst(frame, self.k, self.lane_bits)
        ok, bad = validate_burst(packets, kind=Kind.DATA, job=JOB_ID, worker=rank,
                                 slots=self.slots)
        self.switch_rejected += sum(bad.values())
        out = self.switch.receive(packets[ok], rank)
        if len(out.multicast):
            for r in range(len(self.clients)):
                self._post("down", r, out.multicast)
        if len(out.unicast):
            self._post("down", rank, out.unicast)
        return []

    # ---- driving calls -------------------------------------------------------------------

    def run(self, calls: list[StreamCall], max_steps: int = 200_000) -> None:
        """Advance the fake clock until every call is complete.

        Raises:
            AssertionError: the network went quiet with calls pending, or max_steps ran out.
        """
        for _ in range(max_steps):
            for rank, client in enumerate(self.clients):
                for burst in client.transmit(self.now):
                    self._post("up", rank, burst)
            if all(c.complete for c in calls):
                return
            deadlines = [d for d in (c.next_deadline() for c in self.clients) if d is not None]
            if self._events:
                deadlines.append(self._events[0][0])
            assert deadlines, "nothing in flight and nothing scheduled, yet calls are pending"
            self.now = max(self.now, min(deadlines))
            while self._events and self._events[0][0] <= self.now:
                _, _, direction, rank, frame = heapq.heappop(self._events)
                self._deliver(direction, rank, frame)
        raise AssertionError(f"calls still pending after {max_steps} steps")

    def allreduce(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """One plain all-reduce: rank r contributes inputs[r]; returns each rank's result."""
        calls = [c.submit(len(x), array_fill(pack_lanes(x, self.lane_bits), self.k), self.now)
                 for c, x in zip(self.clients, inputs)]
        self.run(calls)
        return [call.result() for call in calls]

    def allreduce_stream(self, numel: int, fills: list[FillFn]) -> list[StreamCall]:
        """One streaming all-reduce with a fill per rank; returns the completed calls."""
        calls = [c.submit(numel, f, self.now) for c, f in zip(self.clients, fills)]
        self.run(calls)
        return calls
