"""The fast dataplane: SwitchML's aggregation rules applied to a whole burst at once.

What it owns: the same slot pool and the same rules as the golden model (`_golden.py`, whose
essay states them), with state as arrays, applied a burst per call by one of two engines: a compiled pass
(`_dataplane_jit`, numba; the default wherever numba imports) or a vectorized numpy path (below;
what runs without numba, and a second implementation the tests hold to the same contract). What it
must never do: differ from the golden model. For any sequence of bursts, `receive()` returns
byte-identical RESULT and RESULT_RETX bursts and leaves equal counters; the property tests in
tests/test_dataplane.py hold both engines to that. Like the golden model it does no I/O and reads no
clock. `receive()` trusts its input to be validated (`switchagg.packet.validate_burst`);
`receive_checked()` validates it in the same call (the server's path: in the compiled pass the
checks cost nothing extra) with the same drops and per-reason counts as `validate_burst`.
`receive_split_checked()` does the same for a split frame (header words and payloads in two
arrays, as the client sends them) and answers in the same layout. The compiled pass writes its
results into pooled buffers (`_buffers.RowPool`), reused once the socket has sent them.

The compiled pass (read `_dataplane_jit`) walks the burst once, packet after packet, which makes
every burst exact, repeated slots included, at the cost of one pass over its bytes. It is imported
on first use (`warm_up()`, which the switch calls before it binds), so `import switch_emulator`
does not import numba. Figures (`python -m switch_emulator.dataplane --bench`, n = 4, k = 64, the
project's shared 2-vCPU VM under load): a 1024-packet burst 54 us (numpy path: 184 us), 4096
packets 180 us (674), 1024 with 1% duplicates 75 us (455).

State, indexed by the flat slot id f = version * slots + slot (one fancy index reaches both sets):
    values    (2s, k) lanes   the running sum, or the shadow copy once complete (int32, int16 or
                              int8: the job's lane width, chosen at JOIN)
    seen      (n, 2s) bool    seen[w, f]: worker w contributed to the round on f (one plane per
                              worker: a burst comes from one worker, so each stage reads one plane)
    count     (2s,)   int32   contributions to the round on f; == n means complete
    exponent  (2s,)   int8    max block exponent of the round
    wrapped   (2s,)   bool    some addition of the round wrapped int32

The numpy path's rules, in the order of SwitchML's Algorithm 3, each a private function below:
  1. seen bitmap (`_seen_bitmap`): a packet whose bit is already set is a retransmission; the others
     set their bit in their version's set and clear it in the other version's set.
  2. worker count (`_worker_count`): a complete slot that gets a new contribution starts a new round
     (count 0); the contribution with count 0 is the first; count += 1; count == n completes it.
  3. exponent max (`_exponent_max`): the first contribution writes its exponent; later ones keep
     the max.
  4. write or add (`_write_or_add`): the first contribution writes its values; later ones add with
     wrap-around at the lane width. numpy's add of int32 (int16, int8) arrays already wraps (two's
     complement, like the switch's bit<32> adder); an element wrapped iff both operands have the
     same sign and the sum has the other one, i.e. ((a ^ sum) & (b ^ sum)) < 0, so no wider copy
     is needed, whatever the lane width.
  5. multicast or shadow-copy unicast (`_results`): a completed slot goes to every worker (RESULT);
     a retransmission to a complete slot goes back to its sender alone (RESULT_RETX) with the shadow
     copy; a retransmission to a slot still in progress is dropped.

Theory of operation. Within one burst every packet comes from the same worker, and every state cell
belongs to one slot (both versions of slot i interact: rule 1 clears the other version's bit). So
two packets to different slots commute, and only packets to the same slot must be applied in input
order. The numpy path therefore ranks each packet by how many earlier packets of the burst address its
slot and applies the rank-0 packets (all distinct slots) as one vectorized step, then the rank-1
packets, and so on. This needs as many steps as the most repeated slot has packets, never more than
cutting the burst into consecutive runs of distinct slots would, and usually far fewer (duplicates
scattered through a burst cost one extra step in all, not one each). A well-behaved worker never
repeats a slot within a burst (it holds at most one chunk per slot in flight), so the common case is
exactly one step. The outputs of the steps are merged back into input order. Each result is gathered
from the state in the step that produces it (a later step may start a new round on the same slot)
into newly allocated arrays, because the caller sends them without copying while the state moves on.

Performance of the numpy path (the project's 2-vCPU VM, n = 4, k = 64, measured with the bench
above before the compiled pass existed): a 1024-packet burst takes about 0.2 ms, a 4096-packet one
about 0.65 ms. Most of the rest is numpy call overhead (about 70 us per step) and page faults:
large temporaries are faulted in on every burst, so stages 4 and 5 gather through reusable scratch buffers and move records with `take`.

Warning: the cost is per step, not per packet. A burst that repeats one slot B times takes B steps
of tiny arrays (about 0.1 ms each, twice the golden model's per-packet cost). Only a broken or
hostile worker sends that; it holds up the switch's loop for that long, and the results stay exact.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from switch_emulator._buffers import RowPool
from switch_emulator._golden import DataplaneCounters, DataplaneOutput
from switchagg.packet import (DEFAULT_LANE_BITS, FLAG_WRAPPED, MAX_WORKERS, Kind, SLOT_MASK,
                              check_lane_bits, join_split, lane_dtype, packet_dtype, validate_burst)

__all__ = ["FastDataplane", "SplitOutput", "warm_up"]

_UNLOADED = object()
_kernels: object = _UNLOADED  # the _dataplane_jit module, None without numba, until first asked


class SplitOutput(NamedTuple):
    """Results of a split frame, as (B, 4) header words and (B, k) lanes: `mc_*` to multicast
    (RESULT), `uc_*` to the sender alone (RESULT_RETX), each in input order. Send them as they
    are; they are pooled buffers, reused once nothing references them."""

    mc_heads: np.ndarray
    mc_vals: np.ndarray
    uc_heads: np.ndarray
    uc_vals: np.ndarray


def _compiled():
    """The compiled pass's module (imported on first use: it imports numba), or None where numba
    is missing or the host is big-endian (the pass reads header fields as little-endian words)."""
    global _kernels
    if _kernels is _UNLOADED:
        try:
            from switch_emulator import _dataplane_jit
        except ImportError:
            _kernels = None
        else:
            _kernels = _dataplane_jit if sys.byteorder == "little" else None
    return _kernels


def warm_up() -> bool:
    """Load (or, with a cold cache, compile) the compiled pass now; False if it is unavailable.

    The switch calls this before it binds: a compilation takes seconds, a cache load well under
    one, and neither may delay the first JOIN or a liveness deadline.
    """
    jit = _compiled()
    if jit is None:
        return False
    jit.warm_up()
    return True


def _readonly(a: np.ndarray) -> np.ndarray:
    """`a` as a read-only, aligned C-contiguous array (numba compiles one specialization per
    writability and layout; frames from ZeroMQ are read-only)."""
    if not (a.flags.c_contiguous and a.flags.aligned):
        a = np.ascontiguousarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _rows(packets: np.ndarray, width: int) -> np.ndarray:
    """The burst as a read-only (B, width) int32 view (a copy if it is strided or misaligned).

    Always read-only, whatever the caller's buffer allows: numba compiles one specialization per
    writability, and frames from ZeroMQ are read-only.
    """
    if not packets.flags.c_contiguous:
        packets = packets.copy()
    rows = packets.view(np.int32).reshape(len(packets), width)
    if not rows.flags.aligned:  # a frame at an odd address (packet_dtype itself aligns to 1)
        rows = rows.copy()
    if rows.flags.writeable:
        rows = rows.view()
        rows.flags.writeable = False
    return rows


class FastDataplane:
    """One job's slot pool, updated a burst at a time (vectorized; the golden model's semantics).

    Args:
        world_size: number of workers n (1..MAX_WORKERS); a slot completes with n contributions.
        slots: pool size s; packets address slots 0..s-1 (validated before they get here).
        k: lanes (values) per packet.
        compiled: use the compiled pass where numba imports (the default); False keeps the
            vectorized numpy path, which is also what runs without numba.
        lane_bits: the job's lane width, 8, 16 or 32 (default 32: int32 lanes).

    Raises:
        ValueError: world_size, slots, k or lane_bits out of range.
    """

    def __init__(self, world_size: int, slots: int, k: int, compiled: bool = True, *,
                 lane_bits: int = DEFAULT_LANE_BITS) -> None:
        if not 1 <= world_size <= MAX_WORKERS:
            raise ValueError(f"world_size={world_size} must be in [1, {MAX_WORKERS}]")
        if not 1 <= slots <= SLOT_MASK + 1:
            raise ValueError(f"slots={slots} must be in [1, {SLOT_MASK + 1}]")
        self.world_size = world_size
        self.slots = slots
        self.k = k
        self.lane_bits = check_lane_bits(lane_bits)
        self._lanes = lane_dtype(lane_bits)
        self.dtype = packet_dtype(k, lane_bits)
        self.values = np.zeros((2 * slots, k), self._lanes)
        self.seen = np.zeros((world_size, 2 * slots), bool)
        self.count = np.zeros(2 * slots, np.int32)
        self.exponent = np.zeros(2 * slots, np.int8)
        self.wrapped = np.zeros(2 * slots, bool)
        self._scratch = _Scratch(k, self._lanes)
        self._width = self.dtype.itemsize // 4  # int32 words per packet
        self._kernels = _compiled() if compiled else None
        self._stats = np.zeros(len(self._kernels.STAT_NAMES) if self._kernels else 0, np.int64)
        # Result buffers, reused once sent (`_buffers`): interleaved rows, or split heads/values.
        self._pool_rows = RowPool(self._width)
        self._pool_h, self._pool_v = RowPool(4), RowPool(k, self._lanes)
        self.counters = DataplaneCounters()

    def is_complete(self, version: int, slot: int) -> bool:
        return bool(self.count[version * self.slots + slot] == self.world_size)

    def missing_workers(self, version: int, slot: int) -> list[int]:
        """Ranks that have not contributed to the round in progress on (version, slot)."""
        return np.flatnonzero(~self.seen[:, version * self.slots + slot]).tolist()

    def receive(self, packets: np.ndarray, worker: int) -> DataplaneOutput:
        """Apply a burst of valid DATA packets from `worker`, as if one packet at a time.

        Args:
            packets: structured array of `packet_dtype(k)`, validated (kind, job, rank, slot).
            worker: the sender's rank.

        Returns:
            The packets to multicast and to unicast back to `worker`, each in input order, in arrays
            nothing else references (the compiled pass reuses buffers once they are dropped).

        Raises:
            ValueError: the burst has another dtype, `worker` is not a rank of the job, or (compiled
                pass) a packet addresses a slot >= s; all three are bugs of the caller. In the last
                case the other packets were applied and the bad ones skipped.
        """
        self._check_call(packets, worker)
        if self._kernels is not None:
            out, bad = self._receive_compiled(packets, worker, None)
            if bad:
                raise ValueError(f"{bad['bad_slot']} packets address slots >= {self.slots}: "
                                 "validate bursts first (switchagg.packet.validate_burst)")
            return out
        return self._receive_vectorized(packets, worker)

    def receive_checked(self, packets: np.ndarray, worker: int,
                        job: int) -> tuple[DataplaneOutput, dict[str, int]]:
        """Validate a burst as received and apply its good packets, in one pass where compiled.

        Same result as `ok, bad = validate_burst(packets, kind=Kind.DATA, job=job, worker=worker,
        slots=self.slots)` followed by `receive(packets[ok], worker)` (the tests compare them).

        Args:
            packets: structured array of `packet_dtype(k)` straight from `parse_burst`.
            worker: the rank the sending connection joined as.
            job: the job id the packets must carry.

        Returns:
            (output, bad): as `receive`, and the dropped packets counted by first failing reason
            (`switchagg.packet.BAD_REASONS`), only reasons that occurred.

        Raises:
            ValueError: as `receive`, for a wrong dtype or rank.
        """
        self._check_call(packets, worker)
        if self._kernels is not None:
            return self._receive_compiled(packets, worker, job)
        ok, bad = validate_burst(packets, kind=Kind.DATA, job=job, worker=worker,
                                 slots=self.slots)
        return self._receive_vectorized(packets[ok] if bad else packets, worker), bad

    def receive_split_checked(self, heads: np.ndarray, vals: np.ndarray, worker: int,
                              job: int) -> tuple[DataplaneOutput | SplitOutput, dict[str, int]]:
        """`receive_checked` for a split frame: header words and payloads as two arrays.

        Args:
            heads: (B, 4) int32, the header frame as words (`switchagg.packet.parse_split`).
            vals: (B, k) lanes of the job's width (int32, int16 or int8), the payload frame.
            worker, job: as `receive_checked`.

        Returns:
            (output, bad): a `SplitOutput` (results as header words and payloads, in buffers
            reused once nothing references them) from the compiled pass; without numba the
            packets are joined and `receive_checked` runs, returning a `DataplaneOutput`.

        Raises:
            ValueError: a wrong rank, or heads and vals that disagree in length or width.
        """
        if (heads.shape != (len(vals), 4) or vals.shape[1:] != (self.k,)
                or vals.dtype != self._lanes):
            raise ValueError(f"split burst of heads {heads.shape} and values {vals.shape} "
                             f"{vals.dtype} is not (B, 4) and (B, {self.k}) {self._lanes}")
        if self._kernels is None:
            return self.receive_checked(join_split(heads, vals, self.k), worker, job)
        self._check_call(None, worker)
        n = len(heads)
        mc_h, mc_v = self._pool_h.take(n), self._pool_v.take(n)
        uc_h, uc_v = self._pool_h.take(n), self._pool_v.take(n)
        n_mc, n_uc, bad = self._run_compiled(_readonly(heads), _readonly(vals), worker, job,
                                             mc_h, mc_v, uc_h, uc_v)
        return SplitOutput(mc_h[:n_mc], mc_v[:n_mc], uc_h[:n_uc], uc_v[:n_uc]), bad

    def _check_call(self, packets: np.ndarray | None, worker: int) -> None:
        if packets is not None and packets.dtype != self.dtype:
            raise ValueError(f"burst dtype {packets.dtype} is not packet_dtype({self.k}, "
                             f"{self.lane_bits})")
        if not 0 <= worker < self.world_size:
            raise ValueError(f"worker={worker} is not a rank of a job of {self.world_size}")

    def _receive_compiled(self, packets: np.ndarray, worker: int,
                          job: int | None) -> tuple[DataplaneOutput, dict[str, int]]:
        """The compiled pass (`_dataplane_jit.receive_rows`); checks the headers when `job` is
        given, else only the slot bound. Returns the output and the bad-packet counts."""
        n, width = len(packets), self._width
        # Outputs as plain int32 rows from the pool (reused once sent): allocating and viewing
        # structured arrays costs several microseconds each, and fresh pages fault on every burst.
        multicast, unicast = self._pool_rows.take(n), self._pool_rows.take(n)
        rows = _rows(packets, width)
        lanes = self._lanes  # the payload's words as lanes (a view: int16 or int8 columns)
        n_mc, n_uc, bad = self._run_compiled(rows[:, :4], rows[:, 4:].view(lanes), worker, job,
                                             multicast[:, :4], multicast[:, 4:].view(lanes),
                                             unicast[:, :4], unicast[:, 4:].view(lanes))
        return DataplaneOutput(np.ndarray(n_mc, self.dtype, multicast),
                               np.ndarray(n_uc, self.dtype, unicast)), bad

    def _run_compiled(self, heads, vals, worker, job, mc_h, mc_v, uc_h, uc_v):
        """One call of the compiled pass; folds its counters in. Returns (n_mc, n_uc, bad)."""
        jit, stats = self._kernels, self._stats
        stats[:] = 0
        jit.receive_rows(heads, vals, int(worker), -1 if job is None else int(job),
                         job is not None, self.world_size, self.slots, self.values,
                         self.seen[worker], self.count, self.exponent, self.wrapped, mc_h, mc_v,
                         uc_h, uc_v, stats)
        (packets_in, contributions, completions, duplicates, retx, wraps, n_mc, n_uc,
         *bad_counts) = stats.tolist()
        c = self.counters
        c.packets_in += packets_in
        c.contributions += contributions
        c.completions += completions
        c.duplicates_dropped += duplicates
        c.retransmissions_answered += retx
        c.wraps += wraps
        bad = {name: count for name, count in zip(jit.BAD_NAMES, bad_counts) if count} \
            if any(bad_counts) else {}
        return n_mc, n_uc, bad

    def _receive_vectorized(self, packets: np.ndarray, worker: int) -> DataplaneOutput:
        """The numpy path: slices for a run of fresh consecutive slots, else rank-by-rank steps."""
        self.counters.packets_in += len(packets)
        pool = packets["pool_index"]
        slot = pool & SLOT_MASK
        flat = (pool >> 15).astype(np.intp) * self.slots + slot
        run = self._run(packets, flat, worker)
        if run is not None:  # the common case of the common case: one slice of fresh slots
            return run
        rank = _repeat_rank(slot)
        if rank is None:  # the common case: every slot once, one vectorized step
            everything = np.arange(len(packets))
            multicast, unicast, _, _ = self._step(packets, everything, flat, worker)
            return DataplaneOutput(multicast, unicast)
        # Apply rank 0, 1, ... in turn; each step holds distinct slots in input order.
        steps = [self._step(packets, sel, flat[sel], worker)
                 for sel in (np.flatnonzero(rank == r) for r in range(int(rank.max()) + 1))]
        return DataplaneOutput(_in_order([s[0] for s in steps], [s[2] for s in steps]),
                               _in_order([s[1] for s in steps], [s[3] for s in steps]))

    def _run(self, packets: np.ndarray, flat: np.ndarray, worker: int) -> DataplaneOutput | None:
        """Stages 1-5 with slices for a burst of consecutive slots of one version, all new
        contributions that all write or all add (what a well-behaved worker's burst is); None
        (nothing changed) for any other burst, which then takes `_step`.

        Same rules as `_step`, without its fancy indexing: on the project's VM it takes a third of
        the time for a 1024-packet burst (`python -m switch_emulator.dataplane --bench`).
        """
        n = len(flat)
        lo = int(flat[0]) if n else 0
        hi = lo + n
        if (n < 2 or int(flat[-1]) != hi - 1 or lo // self.slots != (hi - 1) // self.slots
                or not (np.diff(flat) == 1).all()):
            return None
        seen_w, count = self.seen[worker], self.count[lo:hi]
        if seen_w[lo:hi].any():  # a retransmission in the burst
            return None
        restart = count == self.world_size
        first = (count == 0) | restart
        n_first = int(np.count_nonzero(first))
        if 0 < n_first < n:
            return None
        # 1. seen bitmap: set in this version, clear in the other one.
        other = lo - self.slots if lo >= self.slots else lo + self.slots
        seen_w[lo:hi] = True
        seen_w[other:other + n] = False
        # 2. worker count (a complete slot starts a new round).
        count[restart] = 0
        count += 1
        # 3. exponent max, 4. write or add.
        exponent, values, incoming = self.exponent[lo:hi], self.values[lo:hi], packets["values"]
        if n_first:
            exponent[:] = packets["exponent"]
            values[:] = incoming
            self.wrapped[lo:hi] = False
        else:
            np.maximum(exponent, packets["exponent"], out=exponent)
            a, b, total, negative = self._scratch.take(n)
            np.add(values, incoming, out=total)  # wraps like the switch's adder
            np.bitwise_xor(values, total, out=a)  # overflow: sign of (a^t) & (b^t), see stage 4
            np.bitwise_xor(incoming, total, out=b)
            a &= b
            wraps = np.less(a, 0, out=negative).any(axis=1)
            values[:] = total
            self.wrapped[lo:hi] |= wraps
            self.counters.wraps += int(np.count_nonzero(wraps))
        self.counters.contributions += n
        # 5. multicast what completed (a fresh array: the caller sends it without copying).
        complete = count == self.world_size
        n_done = int(np.count_nonzero(complete))
        self.counters.completions += n_done
        unicast = np.empty(0, self.dtype)
        if n_done < n:
            rows = complete.nonzero()[0]
            return DataplaneOutput(_results(packets, flat[rows], rows, Kind.RESULT, self), unicast)
        # The header echo, copied as bytes: a structured array's copy() is 4x slower.
        out = (packets.view(np.uint8).copy().view(self.dtype) if packets.flags.c_contiguous
               else packets.copy())
        out["kind"] = Kind.RESULT
        out["flags"] = np.where(self.wrapped[lo:hi], FLAG_WRAPPED, 0)
        out["exponent"] = exponent
        out["reserved"] = 0
        out["values"] = values
        return DataplaneOutput(out, unicast)

    def _step(self, packets: np.ndarray, sel: np.ndarray, flat: np.ndarray, worker: int):
        """Apply the packets `packets[sel]`, which address distinct slots (so their order is free).

        Returns:
            (multicast, unicast, multicast positions, unicast positions): the results and the
            indices into `packets` of the packets they answer.
        """
        new = _seen_bitmap(self.seen[worker], flat, self.slots)
        rows = new.nonzero()[0]
        flat_new = flat[rows]
        first = _worker_count(self.count, flat_new, self.world_size)
        _exponent_max(self.exponent, flat_new, first, packets["exponent"][sel[rows]])
        self.counters.wraps += _write_or_add(self.values, self.wrapped, flat_new, first,
                                             packets["values"], sel[rows], self._scratch)
        # Stage 5 input: a packet that finds its slot complete either completed it (multicast) or
        # is a retransmission to it (shadow-copy unicast); a retransmission elsewhere is dropped.
        complete = self.count[flat] == self.world_size
        mc_at = (complete & new).nonzero()[0]
        uc_at = (complete & ~new).nonzero()[0]
        c = self.counters
        c.contributions += len(rows)
        c.completions += len(mc_at)
        c.retransmissions_answered += len(uc_at)
        c.duplicates_dropped += len(sel) - len(rows) - len(uc_at)
        multicast = _results(packets, flat[mc_at], sel[mc_at], Kind.RESULT, self)
        unicast = _results(packets, flat[uc_at], sel[uc_at], Kind.RESULT_RETX, self)
        return multicast, unicast, sel[mc_at], sel[uc_at]


class _Scratch:
    """Reusable buffers for stages 4 and 5, so a burst allocates no large temporaries.

    Fresh multi-100-KiB arrays come from mmap and are paid for in page faults on every burst (about
    half the time of an addition burst on the project's VMs); these buffers are faulted in once.
    """

    def __init__(self, k: int, lanes=np.int32) -> None:
        self.k = k
        self.lanes = lanes
        self.rows = 0
        self._grow(1024)

    def _grow(self, rows: int) -> None:
        self.rows = rows
        self.a, self.b, self.total = (np.empty((rows, self.k), self.lanes) for _ in range(3))
        self.negative = np.empty((rows, self.k), bool)

    def take(self, m: int):
        """(a, b, total, negative) views of m rows."""
        if m > self.rows:
            self._grow(max(m, 2 * self.rows))
        return self.a[:m], self.b[:m], self.total[:m], self.negative[:m]


def _seen_bitmap(seen_w: np.ndarray, flat: np.ndarray, slots: int) -> np.ndarray:
    """Stage 1: which packets are new contributions; mark them, and clear the other version's bit.

    Args:
        seen_w: this worker's plane of the seen bitmap, (2s,) bool, updated in place.
        flat: flat slot ids of the packets (distinct slots).
        slots: s, to find the other version of the same slot.

    Returns:
        Boolean mask of new contributions (the rest are retransmissions).
    """
    new = ~seen_w[flat]
    flat_new = flat[new]
    seen_w[flat_new] = True
    seen_w[np.where(flat_new >= slots, flat_new - slots, flat_new + slots)] = False
    return new


def _worker_count(count: np.ndarray, flat_new: np.ndarray, world_size: int) -> np.ndarray:
    """Stage 2: count the new contributions, starting a new round on slots that were complete.

    Returns:
        Mask over `flat_new` of the first contributions of a round (count was 0 or complete).
    """
    before = count[flat_new]
    before[before == world_size] = 0
    count[flat_new] = before + 1
    return before == 0


def _exponent_max(exponent: np.ndarray, flat_new: np.ndarray, first: np.ndarray,
                  incoming: np.ndarray) -> None:
    """Stage 3: the first contribution writes its exponent; later ones keep the max."""
    exponent[flat_new] = np.where(first, incoming, np.maximum(exponent[flat_new], incoming))


def _write_or_add(values: np.ndarray, wrapped: np.ndarray, flat_new: np.ndarray,
                  first: np.ndarray, incoming: np.ndarray, rows: np.ndarray,
                  scratch: _Scratch) -> int:
    """Stage 4: first contributions write, later ones add with wrap-around at the lane width.

    Args:
        values, wrapped: the pool's state, updated in place.
        flat_new: flat slot ids of the new contributions; `first` marks the first of a round.
        incoming: the burst's (B, k) values; `rows` picks the new contributions' rows.
        scratch: reusable buffers.

    Returns:
        How many additions wrapped at least one element (the `wraps` counter's increment).
    """
    n_first = int(np.count_nonzero(first))
    if n_first:
        at, src = (flat_new, rows) if n_first == len(rows) else (flat_new[first], rows[first])
        buf = scratch.take(len(src))[0]
        values[at] = incoming.take(src, axis=0, out=buf, mode="clip")
        wrapped[at] = False
        if n_first == len(rows):
            return 0
    add = ~first
    at, src = flat_new[add], rows[add]
    a, b, total, negative = scratch.take(len(at))
    values.take(at, axis=0, out=a, mode="clip")
    incoming.take(src, axis=0, out=b, mode="clip")
    np.add(a, b, out=total)  # lanes + lanes wrap in numpy arrays, as the switch's adder does
    values[at] = total
    # Overflow iff the operands share a sign that the sum does not: sign bit of (a^t) & (b^t).
    a ^= total
    b ^= total
    a &= b
    wraps = np.less(a, 0, out=negative).any(axis=1)
    wrapped[at] |= wraps
    return int(np.count_nonzero(wraps))


def _results(packets: np.ndarray, flat: np.ndarray, rows: np.ndarray, kind: Kind,
             pool: FastDataplane) -> np.ndarray:
    """Stage 5: result packets (multicast or shadow-copy unicast) answering `packets[rows]`.

    Each echoes its request's header (job, worker, pool_index, chunk) with the slot's kind, flags,
    exponent and values, in a newly allocated array (the caller sends it without copying).
    """
    out = np.empty(len(rows), pool.dtype)
    if not len(rows):
        return out
    packets.take(rows, out=out, mode="clip")  # the header echo; values are overwritten below
    out["kind"] = kind
    out["flags"] = np.where(pool.wrapped[flat], FLAG_WRAPPED, 0)
    out["exponent"] = pool.exponent[flat]
    out["reserved"] = 0
    # Gather into a contiguous scratch first: np.take into the strided field, or a fresh temporary,
    # costs 10x more (an extra large allocation per burst, paid in page faults).
    out["values"] = pool.values.take(flat, axis=0, out=pool._scratch.take(len(flat))[0],
                                     mode="clip")
    return out


def _repeat_rank(slot: np.ndarray) -> np.ndarray | None:
    """For each packet, how many earlier packets of the burst address the same slot.

    Returns:
        None when every slot occurs once (the common case), else the rank of each packet.
    """
    ordered = np.sort(slot)
    if not (ordered[1:] == ordered[:-1]).any():
        return None
    order = np.argsort(slot, kind="stable")
    ordered = slot[order]
    repeat = ordered[1:] == ordered[:-1]
    index = np.arange(len(slot))
    run_start = np.maximum.accumulate(np.where(np.r_[True, ~repeat], index, 0))
    rank = np.empty(len(slot), np.intp)
    rank[order] = index - run_start
    return rank


def _in_order(parts: list[np.ndarray], positions: list[np.ndarray]) -> np.ndarray:
    """Merge the steps' results into input order (scattered into one new array, no temporaries)."""
    nonempty = [i for i, part in enumerate(parts) if len(part)]
    if len(nonempty) <= 1:  # typical: later steps only dropped duplicates; already in input order
        return parts[nonempty[0] if nonempty else 0]
    parts = [parts[i] for i in nonempty]
    positions = [positions[i] for i in nonempty]
    sizes = [len(p) for p in parts]
    out = np.empty(sum(sizes), parts[0].dtype)
    where = np.empty(len(out), np.intp)  # where[i]: output index of the i-th result, step by step
    where[np.argsort(np.concatenate(positions), kind="stable")] = np.arange(len(out))
    # Move whole records as rows of int32 (a record is 16 + k * lane_bits / 8 bytes, a multiple of
    # 4): numpy's fancy indexing of
    # structured arrays is several times slower than of plain rows.
    width = out.dtype.itemsize // 4
    rows = out.view(np.int32).reshape(len(out), width)
    for part, end in zip(parts, np.cumsum(sizes)):
        rows[where[end - len(part):end]] = part.view(np.int32).reshape(len(part), width)
    return out
