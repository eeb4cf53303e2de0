"""The golden model: SwitchML's aggregation rules, one packet at a time, as plainly as possible.

What it owns: the reference semantics of one job's slot pool (SwitchML's Algorithm 3
with shadow copies). Every faster dataplane must produce byte-identical outputs and counters for
the same input sequence; the property tests hold them to it. What it must never do: be clever. No
vectorization, no I/O, no clock. Speed does not matter here; obviousness does.

State per (version v, slot i): values[k] (lanes of the job's width: 8, 16 or 32 bits), seen set of
ranks, count, max exponent, wrapped flag.
On a DATA packet from worker w for (v, i), in the order of Algorithm 3:
  1. seen bitmap: if w is already in seen[v][i], it is a retransmission: if the slot is complete,
     answer w alone with the shadow copy (RESULT_RETX); otherwise drop it (a duplicate).
  2. otherwise add w to seen[v][i] and remove it from seen[1-v][i] (the other set may be reused).
  3. worker count: a new round starts when the slot was complete; count += 1.
  4. exponent max: the first contribution writes its exponent, later ones keep the max.
  5. write or add: the first contribution writes its values; later ones add with wrap-around at
     the lane width b (two's complement, as the hardware's bit<b> adder: 127 + 1 = -128 in 8-bit
     lanes), noting whether any element wrapped.
  6. multicast: when count reaches world_size the slot is complete; its values go to every worker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from switchagg.packet import (DEFAULT_LANE_BITS, FLAG_WRAPPED, Kind, check_lane_bits, lane_dtype,
                              packet_dtype, slot_of, version_of)

__all__ = ["DataplaneCounters", "DataplaneOutput", "GoldenDataplane"]


@dataclass
class DataplaneCounters:
    """What a dataplane counts; every implementation keeps exactly these."""

    packets_in: int = 0                 # valid DATA packets handed to receive()
    contributions: int = 0              # first-time contributions accepted into a slot
    completions: int = 0                # slots completed (each one multicast once)
    duplicates_dropped: int = 0         # retransmissions to a slot still in progress
    retransmissions_answered: int = 0   # retransmissions to a complete slot (shadow copy sent)
    wraps: int = 0                      # additions in which at least one lane wrapped

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DataplaneOutput:
    """What to send after one receive(): `multicast` to every worker of the job (RESULT packets,
    in input order), `unicast` to the sender alone (RESULT_RETX packets, in input order)."""

    multicast: np.ndarray
    unicast: np.ndarray


class GoldenDataplane:
    """One job's slot pool, updated packet by packet (the reference implementation).

    Args:
        world_size: number of workers n; a slot completes with n distinct contributions.
        slots: pool size s; packets address slots 0..s-1 (validated before they get here).
        k: lanes (values) per packet.
        lane_bits: the job's lane width, 8, 16 or 32 (default 32: int32 lanes).
    """

    def __init__(self, world_size: int, slots: int, k: int, *,
                 lane_bits: int = DEFAULT_LANE_BITS) -> None:
        self.world_size = world_size
        self.slots = slots
        self.k = k
        self.lane_bits = check_lane_bits(lane_bits)
        self.dtype = packet_dtype(k, lane_bits)
        self.values = np.zeros((2, slots, k), lane_dtype(lane_bits))
        self.seen = [[set() for _ in range(slots)] for _ in range(2)]
        self.count = [[0] * slots for _ in range(2)]
        self.exponent = [[0] * slots for _ in range(2)]
        self.wrapped = [[False] * slots for _ in range(2)]
        self.counters = DataplaneCounters()

    def is_complete(self, version: int, slot: int) -> bool:
        return self.count[version][slot] == self.world_size

    def missing_workers(self, version: int, slot: int) -> list[int]:
        """Ranks that have not contributed to the round in progress on (version, slot)."""
        return [w for w in range(self.world_size) if w not in self.seen[version][slot]]

    def receive(self, packets: np.ndarray, worker: int) -> DataplaneOutput:
        """Apply a burst of valid DATA packets from `worker`, one packet at a time.

        Args:
            packets: structured array of `packet_dtype(k)`, already validated (kind, job, rank, slot).
            worker: the sender's rank.

        Returns:
            The packets to multicast and to unicast back to `worker`.
        """
        multicast, unicast = [], []
        for packet in packets:
            self.counters.packets_in += 1
            out = self._receive_one(packet, worker)
            if out is not None:
                (multicast if out["kind"] == Kind.RESULT else unicast).append(out)
        return DataplaneOutput(np.array(multicast, self.dtype), np.array(unicast, self.dtype))

    def _receive_one(self, packet: np.void, worker: int) -> np.void | None:
        v = int(version_of(int(packet["pool_index"])))
        i = int(slot_of(int(packet["pool_index"])))
        # 1. seen bitmap: a retransmission gets the shadow copy if the slot is complete, else nothing.
        if worker in self.seen[v][i]:
            if self.is_complete(v, i):
                self.counters.retransmissions_answered += 1
                return self._result(packet, v, i, Kind.RESULT_RETX)
            self.counters.duplicates_dropped += 1
            return None
        # 2. mark w in this set, clear it in the other, so the other set can start its next round.
        self.seen[v][i].add(worker)
        self.seen[1 - v][i].discard(worker)
        # 3. worker count: a complete slot being contributed to again starts a new round.
        if self.count[v][i] == self.world_size:
            self.count[v][i] = 0
        first = self.count[v][i] == 0
        self.count[v][i] += 1
        self.counters.contributions += 1
        # 4. exponent max.
        exponent = int(packet["exponent"])
        self.exponent[v][i] = exponent if first else max(self.exponent[v][i], exponent)
        # 5. write or add with wrap-around at the lane width b.
        incoming = [int(x) for x in packet["values"]]
        if first:
            self.values[v, i] = incoming
            self.wrapped[v][i] = False
        else:
            half = 1 << (self.lane_bits - 1)
            exact = [int(a) + b for a, b in zip(self.values[v, i], incoming)]
            wrapped = [((x + half) % (2 * half)) - half for x in exact]
            if wrapped != exact:
                self.wrapped[v][i] = True
                self.counters.wraps += 1
            self.values[v, i] = wrapped
        # 6. multicast when complete.
        if self.is_complete(v, i):
            self.counters.completions += 1
            return self._result(packet, v, i, Kind.RESULT)
        return None

    def _result(self, packet: np.void, v: int, i: int, kind: Kind) -> np.void:
        out = np.zeros((), self.dtype)
        for name in ("magic", "version", "job", "worker", "pool_index", "chunk"):
            out[name] = packet[name]
        out["kind"] = kind
        out["flags"] = FLAG_WRAPPED if self.wrapped[v][i] else 0
        out["exponent"] = self.exponent[v][i]
        out["values"] = self.values[v, i]
        return out[()]
