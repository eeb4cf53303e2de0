"""Tests of the switch dataplanes: every rule of DESIGN.md §5 by hand, then golden == fast on
random runs.

Semantic tests run over both dataplanes (the `make` fixture), as msgpack runs its suite over both of
its implementations; the property tests feed the same bursts to both and demand byte-identical
output.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switch_emulator import _dataplane
from switch_emulator._dataplane import SplitOutput
from switch_emulator.dataplane import (DATAPLANES, DataplaneCounters, DataplaneOutput,
                                       FastDataplane, GoldenDataplane, make_dataplane, warm_up)
from switchagg.packet import (FLAG_WRAPPED, LANE_BITS, MAGIC, Kind, join_split, make_burst,
                              packet_dtype, parse_burst, split_burst, validate_burst)

K = 8
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


@pytest.fixture(params=sorted(DATAPLANES) + ["fast-numpy"])
def make(request):
    """A factory of fresh dataplanes of the parametrized kind: make(world_size, slots, k=K).

    "fast" runs the compiled pass; "fast-numpy" is the same class on its vectorized numpy path.
    """
    if request.param == "fast-numpy":
        return lambda world_size, slots, k=K: FastDataplane(world_size, slots, k, compiled=False)
    return lambda world_size, slots, k=K: make_dataplane(request.param, world_size, slots, k)


def data(worker, slots, versions=0, values=None, exponents=0, chunks=None, k=K, job=7):
    """A DATA burst from `worker` (values default to worker + 1 everywhere)."""
    slots = np.atleast_1d(slots)
    versions = np.broadcast_to(versions, slots.shape)
    if values is None:
        values = np.full((len(slots), k), worker + 1, np.int32)
    values = np.asarray(values, np.int64).reshape(len(slots), k).astype(np.int32)
    chunks = np.arange(len(slots)) if chunks is None else chunks
    return make_burst(Kind.DATA, job, worker, slots, versions, chunks, values, exponents, k=k)


def contribute_all(dp, slot=0, version=0, skip_last=False):
    """Every worker sends one packet to (version, slot); returns the outputs of the last call."""
    out = None
    for w in range(dp.world_size - (1 if skip_last else 0)):
        out = dp.receive(data(w, slot, version), w)
    return out


# ----------------------------------------------------------------------------------------------
# make_dataplane


def test_make_dataplane_builds_each_registered_kind():
    assert DATAPLANES == {"golden": GoldenDataplane, "fast": FastDataplane}
    for name, cls in DATAPLANES.items():
        dp = make_dataplane(name, 3, 16, 64)
        assert isinstance(dp, cls)
        assert (dp.world_size, dp.slots, dp.k) == (3, 16, 64)
        assert dp.counters == DataplaneCounters()


@pytest.mark.parametrize("name", ["", "Fast", "numba", None])
def test_make_dataplane_unknown_name_lists_valid_ones(name):
    with pytest.raises(ValueError, match=r"\['fast', 'golden'\]"):
        make_dataplane(name, 2, 4, K)


# ----------------------------------------------------------------------------------------------
# the rules, one by one


def test_receive_first_contribution_writes_then_adds(make):
    dp = make(2, 4)
    first = dp.receive(data(0, 1, values=np.arange(K) - 3), 0)
    assert len(first.multicast) == 0 and len(first.unicast) == 0
    assert not dp.is_complete(0, 1)
    out = dp.receive(data(1, 1, values=10 * np.arange(K)), 1)
    assert len(out.unicast) == 0
    (result,) = out.multicast
    assert result["kind"] == Kind.RESULT
    assert result["values"].tolist() == (11 * np.arange(K) - 3).tolist()
    assert result["flags"] == 0
    assert dp.is_complete(0, 1)
    assert dp.counters == DataplaneCounters(packets_in=2, contributions=2, completions=1)


def test_receive_new_round_writes_over_the_old_sum(make):
    dp = make(2, 1)
    contribute_all(dp, 0, 0)          # round 1 on version 0: sum 1 + 2
    contribute_all(dp, 0, 1)          # version 1 clears both workers' bits on version 0
    out = contribute_all(dp, 0, 0)    # round 2 on version 0: written, not added to round 1
    assert out.multicast["values"].tolist() == [[3] * K]
    assert dp.counters.completions == 3


def test_receive_int32_addition_wraps_like_twos_complement(make):
    dp = make(2, 1)
    a = [INT32_MAX, INT32_MIN, -1, 5, INT32_MAX, INT32_MIN, 0, 1 << 30]
    b = [1, -1, -1, -9, INT32_MAX, INT32_MIN, INT32_MIN, 1 << 30]
    dp.receive(data(0, 0, values=a), 0)
    (result,) = dp.receive(data(1, 0, values=b), 1).multicast
    expected = [INT32_MIN, INT32_MAX, -2, -4, -2, 0, INT32_MIN, INT32_MIN]
    assert result["values"].tolist() == expected
    assert result["flags"] == FLAG_WRAPPED
    assert dp.counters.wraps == 1


def test_receive_wrapped_flag_counts_each_wrapping_addition_and_resets_per_round(make):
    dp = make(3, 1)
    for w in range(3):  # MAX + MAX wraps to -2, then -2 + MIN wraps again
        dp.receive(data(w, 0, values=[INT32_MAX] * K if w < 2 else [INT32_MIN] * K), w)
    assert dp.counters.wraps == 2
    # A round without wrap: flag cleared by the first write of the next round on the same version.
    contribute_all(dp, 0, 1)
    out = contribute_all(dp, 0, 0)
    assert out.multicast["flags"].tolist() == [0]
    assert dp.counters.wraps == 2


def test_receive_no_wrap_at_the_edges(make):
    dp = make(2, 1)
    dp.receive(data(0, 0, values=[INT32_MAX, INT32_MIN, INT32_MAX, -1, 0, 0, 0, 0]), 0)
    (result,) = dp.receive(data(1, 0, values=[0, 0, INT32_MIN, 1, 0, 0, 0, 0]), 1).multicast
    assert result["values"][:4].tolist() == [INT32_MAX, INT32_MIN, -1, 0]
    assert result["flags"] == 0 and dp.counters.wraps == 0


@pytest.mark.parametrize("exponents,expected", [
    ([-5, -3, -7], -3),        # all negative: the initial 0 must not leak in
    ([3, 9, -1], 9),
    ([-128, -128, -128], -128),
    ([127, -128, 0], 127),
])
def test_receive_keeps_the_exponent_max(make, exponents, expected):
    dp = make(3, 2)
    for w, e in enumerate(exponents):
        out = dp.receive(data(w, 1, exponents=e), w)
    assert out.multicast["exponent"].tolist() == [expected]


def test_receive_duplicate_to_incomplete_slot_is_dropped(make):
    dp = make(2, 1)
    dp.receive(data(0, 0), 0)
    again = dp.receive(data(0, 0), 0)
    assert len(again.multicast) == 0 and len(again.unicast) == 0
    assert dp.counters.duplicates_dropped == 1
    (result,) = dp.receive(data(1, 0), 1).multicast
    assert result["values"].tolist() == [3] * K  # not 1 + 1 + 2
    assert dp.counters.contributions == 2


def test_receive_retransmission_to_complete_slot_gets_the_shadow_copy(make):
    dp = make(2, 1)
    contribute_all(dp, 0, 0)                                  # version 0 complete: sum 3
    dp.receive(data(0, 0, versions=1, values=[100] * K), 0)   # worker 0 moved on to version 1
    # Worker 1 lost the multicast and retransmits version 0 while version 1 is in use.
    out = dp.receive(data(1, 0, versions=0, chunks=[42]), 1)
    assert len(out.multicast) == 0
    (retx,) = out.unicast
    assert retx["kind"] == Kind.RESULT_RETX
    assert retx["values"].tolist() == [3] * K
    assert retx["chunk"] == 42 and retx["worker"] == 1
    assert dp.counters.retransmissions_answered == 1
    # The round on version 1 goes on undisturbed.
    (result,) = dp.receive(data(1, 0, versions=1, values=[1] * K), 1).multicast
    assert result["values"].tolist() == [101] * K


def test_receive_results_echo_the_request_header(make):
    dp = make(1, 8)
    burst = data(0, [5, 2, 7], versions=[1, 0, 1], chunks=[9, 10, 11], exponents=[-2, 0, 4])
    burst["flags"] = 0xFF  # overwritten by the switch's own flags
    out = dp.receive(burst, 0)
    m = out.multicast
    assert m["kind"].tolist() == [Kind.RESULT] * 3
    assert m["pool_index"].tolist() == burst["pool_index"].tolist()  # input order, not slot order
    assert m["chunk"].tolist() == [9, 10, 11]
    assert m["job"].tolist() == [7] * 3 and m["worker"].tolist() == [0] * 3
    assert m["exponent"].tolist() == [-2, 0, 4]
    assert m["flags"].tolist() == [0] * 3 and m["reserved"].tolist() == [0] * 3
    assert m.dtype == packet_dtype(K) and out.unicast.dtype == packet_dtype(K)


def test_receive_results_are_new_arrays(make):
    dp = make(1, 4)
    burst = data(0, [0, 1])
    out = dp.receive(burst, 0)
    state = getattr(dp, "values")
    assert not np.shares_memory(out.multicast, burst)
    assert not np.shares_memory(out.multicast, state)
    before = out.multicast.tobytes()
    contribute_all(dp, 0, 1), contribute_all(dp, 0, 0)  # new rounds rewrite slot 0's state
    dp.receive(data(0, [0, 1], values=np.full((2, K), 99)), 0)
    assert out.multicast.tobytes() == before


def test_receive_takes_a_read_only_frame_view(make):
    dp = make(1, 4)
    frame = data(0, [3, 1]).tobytes()
    packets, _ = parse_burst(frame, K)
    assert not packets.flags.writeable
    out = dp.receive(packets, 0)
    assert out.multicast["chunk"].tolist() == [0, 1] and out.multicast.flags.writeable
    assert not np.shares_memory(out.multicast, packets)


def test_receive_empty_burst(make):
    dp = make(2, 4)
    out = dp.receive(np.zeros(0, packet_dtype(K)), 0)
    assert out.multicast.shape == (0,) and out.unicast.shape == (0,)
    assert out.multicast.dtype == packet_dtype(K)
    assert dp.counters == DataplaneCounters()


def test_receive_repeated_slot_in_one_burst_applies_in_order(make):
    dp = make(1, 2)
    # One worker: (v0) completes, (v0) again is a retransmission to a complete slot, (v1) clears the
    # v0 bit and completes v1, (v0) then starts a new round; slot 1 in between is independent.
    burst = data(0, [0, 0, 1, 0, 0], versions=[0, 0, 0, 1, 0], chunks=[0, 1, 2, 3, 4],
                 values=np.arange(5 * K).reshape(5, K))
    out = dp.receive(burst, 0)
    assert out.multicast["chunk"].tolist() == [0, 2, 3, 4]
    assert out.unicast["chunk"].tolist() == [1]
    assert out.unicast["values"].tolist() == burst["values"][:1].tolist()  # round 1's copy
    assert out.multicast["values"][3].tolist() == burst["values"][4].tolist()
    assert dp.counters == DataplaneCounters(packets_in=5, contributions=4, completions=4,
                                            retransmissions_answered=1)


@pytest.mark.parametrize("world_size", [1, 2, 64, 256])
def test_receive_completes_after_exactly_world_size_workers(make, world_size):
    dp = make(world_size, 3)
    for w in range(world_size):
        assert dp.missing_workers(0, 2) == list(range(w, world_size))
        out = dp.receive(data(w, 2, values=np.full(K, w - 5)), w)
        assert len(out.multicast) == (w == world_size - 1)
    assert dp.is_complete(0, 2) and not dp.is_complete(1, 2)
    assert dp.missing_workers(0, 2) == []
    expected = sum(range(world_size)) - 5 * world_size
    assert out.multicast["values"].tolist() == [[expected] * K]
    assert dp.counters.completions == 1 and dp.counters.contributions == world_size


def test_receive_alternates_versions_across_rounds(make):
    n, s = 3, 2
    dp = make(n, s)
    for rnd in range(6):  # chunk c -> slot c mod s, version (c div s) mod 2, as the client numbers
        for slot in range(s):
            chunk = rnd * s + slot
            for w in range(n):
                out = dp.receive(data(w, slot, versions=rnd % 2, chunks=[chunk],
                                      values=np.full(K, chunk * 10 + w)), w)
            assert out.multicast["chunk"].tolist() == [chunk]
            assert out.multicast["values"].tolist() == [[30 * chunk + 3] * K]
    assert dp.counters.completions == 12 and dp.counters.duplicates_dropped == 0


def test_missing_workers_after_the_other_version_clears_a_bit(make):
    dp = make(3, 1)
    contribute_all(dp, 0, 0)
    assert dp.missing_workers(0, 0) == []
    dp.receive(data(1, 0, versions=1), 1)
    assert dp.missing_workers(0, 0) == [1]  # its v0 bit was cleared for the next round
    assert dp.missing_workers(1, 0) == [0, 2]
    assert dp.is_complete(0, 0)  # the shadow copy stays complete until a new round starts


def test_fast_dataplane_rejects_caller_bugs():
    dp = FastDataplane(2, 4, K)
    with pytest.raises(ValueError, match="packet_dtype"):
        dp.receive(np.zeros(1, packet_dtype(16)), 0)
    with pytest.raises(ValueError, match="rank"):
        dp.receive(data(2, 0), 2)
    with pytest.raises(ValueError, match="world_size"):
        FastDataplane(0, 4, K)


def test_fast_dataplane_compiled_pass_skips_and_reports_slots_out_of_range():
    dp = FastDataplane(1, 4, K)
    burst = data(0, [1, 2, 3])
    burst["pool_index"][1] = 4  # slot 4 of 4: an unvalidated burst (the caller's bug)
    with pytest.raises(ValueError, match="slots >= 4.*validate_burst"):
        dp.receive(burst, 0)
    assert dp.counters == DataplaneCounters(packets_in=2, contributions=2, completions=2)


# ----------------------------------------------------------------------------------------------
# golden == fast: protocol runs with loss, duplicates and reordering, and adversarial bursts


def assert_same(golden, *fast, packets, worker):
    """Feed every dataplane the same burst; their outputs must be byte-identical to the golden
    model's. Returns the first fast dataplane's output."""
    g = golden.receive(packets.copy(), worker)
    outs = [dp.receive(packets.copy(), worker) for dp in fast]
    for f, dp in zip(outs, fast):
        assert g.multicast.tobytes() == f.multicast.tobytes()
        assert g.unicast.tobytes() == f.unicast.tobytes()
        assert g.multicast.dtype == f.multicast.dtype and g.unicast.dtype == f.unicast.dtype
        assert golden.counters == dp.counters
    return outs[0]


class ProtocolRun:
    """n self-clocked workers reducing `chunks` chunks through one dataplane pair, with faults.

    A worker sends chunk c only after it holds the result of chunk c - s; it retransmits chunks
    whose result it lacks. The link loses packets both ways, duplicates and reorders them, all drawn
    from a seeded generator. Every result a worker accepts is checked against the exact wrapping
    sum.
    """

    def __init__(self, dataplanes, n, s, k, chunks, rng, drop=0.1, dup=0.1, reorder=0.3,
                 wide=False):
        self.dps, self.n, self.s, self.k, self.chunks, self.rng = dataplanes, n, s, k, chunks, rng
        self.drop, self.dup, self.reorder = drop, dup, reorder
        hi = 1 << 31 if wide else 1000
        self.values = rng.integers(-hi, hi, (n, chunks, k)).astype(np.int32)
        self.exponents = rng.integers(-128, 128, (n, chunks)).astype(np.int8)
        self.expected = self.values.astype(np.int64).sum(axis=0).astype(np.int32)  # wraps
        self.got = np.zeros((n, chunks), bool)
        self.sent = np.zeros((n, chunks), bool)

    def done(self) -> bool:
        return bool(self.got.all())

    def step(self, burst_max: int) -> None:
        w = int(self.rng.integers(self.n))
        c = np.arange(self.chunks)
        ready = np.ones(self.chunks, bool)  # self-clocking: chunk c waits for the result of c - s
        ready[self.s:] = self.got[w, :max(self.chunks - self.s, 0)]
        allowed = ~self.sent[w] & ready
        fresh = c[allowed][:int(self.rng.integers(1, burst_max + 1))]
        pending = c[self.sent[w] & ~self.got[w]]
        retx = pending[self.rng.random(len(pending)) < 0.3]
        picks = np.concatenate([retx, fresh]).astype(np.int64)
        self.sent[w, fresh] = True
        picks = picks[self.rng.random(len(picks)) >= self.drop]            # ingress loss
        picks = np.concatenate([picks, picks[self.rng.random(len(picks)) < self.dup]])
        if self.rng.random() < self.reorder:
            picks = self.rng.permutation(picks)
        burst = make_burst(Kind.DATA, 3, w, picks % self.s, (picks // self.s) % 2, picks,
                           self.values[w, picks].reshape(len(picks), self.k),
                           self.exponents[w, picks], k=self.k)
        out = assert_same(*self.dps, packets=burst, worker=w)
        for u in range(self.n):
            self.deliver(u, out.multicast)
        self.deliver(w, out.unicast)

    def deliver(self, u: int, results: np.ndarray) -> None:
        kept = results[self.rng.random(len(results)) >= self.drop]        # egress loss
        for r in kept:
            chunk = int(r["chunk"])
            assert r["values"].tolist() == self.expected[chunk].tolist()
            assert r["exponent"] == self.exponents[:, chunk].max()
            self.got[u, chunk] = True


def pair(n, s, k):
    """The golden model, the compiled fast dataplane and the vectorized one, all empty."""
    return GoldenDataplane(n, s, k), FastDataplane(n, s, k), FastDataplane(n, s, k, compiled=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5), s=st.integers(1, 6), k=st.sampled_from([8, 16]),
       chunks=st.integers(1, 20), burst_max=st.integers(1, 8),
       drop=st.sampled_from([0.0, 0.1, 0.4]), dup=st.sampled_from([0.0, 0.2, 0.6]),
       wide=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_receive_golden_equals_fast_on_protocol_runs(n, s, k, chunks, burst_max, drop, dup, wide,
                                                     seed):
    run = ProtocolRun(pair(n, s, k), n, s, k, chunks, np.random.default_rng(seed), drop=drop,
                      dup=dup, wide=wide)
    for _ in range(40):
        run.step(burst_max)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), s=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       calls=st.integers(1, 30))
def test_receive_golden_equals_fast_on_adversarial_bursts(n, s, seed, calls):
    rng = np.random.default_rng(seed)
    dps = pair(n, s, K)
    for _ in range(calls):
        size = int(rng.integers(0, 12))
        raw = rng.integers(0, 256, size * packet_dtype(K).itemsize, dtype=np.uint8)
        burst = raw.view(packet_dtype(K)).copy()      # every header field random...
        burst["pool_index"] = rng.integers(0, s, size) | (rng.integers(0, 2, size) << 15)
        if rng.random() < 0.5:                        # ...values small or full range
            burst["values"] //= 1 << 28
        assert_same(*dps, packets=burst, worker=int(rng.integers(n)))


@pytest.mark.parametrize("n,s,drop,dup", [(1, 3, 0.0, 0.0), (4, 4, 0.2, 0.2), (8, 5, 0.4, 0.5)])
def test_receive_protocol_run_yields_exact_sums(n, s, drop, dup):
    run = ProtocolRun(pair(n, s, K), n, s, K, chunks=24, rng=np.random.default_rng(n),
                      drop=drop, dup=dup, wide=True)
    for _ in range(5000):
        if run.done():
            break
        run.step(burst_max=6)
    assert run.done(), f"not every worker got every chunk: {np.argwhere(~run.got)[:5]}"
    golden, fast, _ = run.dps
    assert golden.counters.completions == fast.counters.completions >= 24


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), s=st.integers(2, 16), seed=st.integers(0, 2**32 - 1))
def test_receive_golden_equals_fast_on_runs_of_consecutive_slots(n, s, seed):
    """Bursts of consecutive slots (the fast dataplane's slice path), starting anywhere, of any
    version, some repeated (retransmissions) or skipped (losses), values over the full range."""
    rng = np.random.default_rng(seed)
    dps = pair(n, s, K)
    for _ in range(40):
        worker, start = int(rng.integers(n)), int(rng.integers(0, 4 * s))
        chunks = np.arange(start, start + int(rng.integers(1, s + 1)))
        values = rng.integers(-2**31, 2**31, (len(chunks), K), dtype=np.int64).astype(np.int32)
        burst = make_burst(Kind.DATA, 0, worker, chunks % s, (chunks // s) % 2, chunks, values,
                           rng.integers(-8, 8, len(chunks)), k=K)
        assert_same(*dps, packets=burst, worker=worker)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), s=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_receive_golden_equals_fast_on_bursts_of_distinct_scattered_slots(n, s, seed):
    """What a worker with a full window sends: distinct slots in any order and either version,
    values over the full range (wraps), some bursts resent whole (retransmissions, answered once
    complete), and now and then a burst that repeats a slot."""
    rng = np.random.default_rng(seed)
    dps = pair(n, s, K)
    sent = []
    for _ in range(30):
        worker = int(rng.integers(n))
        if sent and rng.random() < 0.2:
            burst = sent[int(rng.integers(len(sent)))].copy()
            burst["worker"] = worker
        else:
            slots = rng.permutation(s)[:int(rng.integers(1, s + 1))]
            if rng.random() < 0.1:
                slots = np.concatenate([slots, slots[:1]])
            values = rng.integers(-2**31, 2**31, (len(slots), K), dtype=np.int64)
            burst = make_burst(Kind.DATA, 0, worker, slots, rng.integers(0, 2, len(slots)),
                               rng.integers(0, 2**32, len(slots)), values.astype(np.int32),
                               rng.integers(-128, 128, len(slots)), k=K)
            sent.append(burst)
        assert_same(*dps, packets=burst, worker=worker)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), s=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
       calls=st.integers(1, 20))
def test_receive_checked_equals_validate_burst_then_golden(n, s, seed, calls):
    """The fused checks drop and count exactly what `validate_burst` does (first failing reason),
    and the good packets of a burst, in order, do exactly what they do in the golden model."""
    rng = np.random.default_rng(seed)
    golden, compiled, vectorized = pair(n, s, K)
    split_compiled, split_vectorized = FastDataplane(n, s, K), FastDataplane(n, s, K, False)
    job = 5
    for _ in range(calls):
        worker, size = int(rng.integers(n)), int(rng.integers(0, 16))
        burst = data(worker, rng.integers(0, s, size), rng.integers(0, 2, size), job=job,
                     values=rng.integers(-2**31, 2**31, (size, K)), chunks=np.arange(size),
                     exponents=rng.integers(-128, 128, size))
        # Spoil some packets, one field each or several (first failing reason counts).
        for field, bad in (("magic", MAGIC ^ 1), ("version", 9), ("kind", Kind.RESULT),
                           ("reserved", 1), ("job", job + 1), ("worker", worker + 1),
                           ("pool_index", s)):
            hit = rng.random(size) < 0.08
            burst[field][hit] = bad
        ok, expected_bad = validate_burst(burst, kind=Kind.DATA, job=job, worker=worker, slots=s)
        g = golden.receive(burst[ok], worker)
        for dp in (compiled, vectorized):
            out, bad = dp.receive_checked(burst.copy(), worker, job)
            assert bad == expected_bad
            assert out.multicast.tobytes() == g.multicast.tobytes()
            assert out.unicast.tobytes() == g.unicast.tobytes()
            assert dp.counters == golden.counters
        # The same packets as a split frame (header words, payloads): same results and counts.
        heads, vals = split_burst(burst)
        heads.flags.writeable = vals.flags.writeable = False  # as frames from ZeroMQ are
        for dp in (split_compiled, split_vectorized):
            out, bad = dp.receive_split_checked(heads, vals, worker, job)
            assert bad == expected_bad
            if isinstance(out, SplitOutput):
                out = DataplaneOutput(join_split(out.mc_heads, out.mc_vals, K),
                                      join_split(out.uc_heads, out.uc_vals, K))
            assert out.multicast.tobytes() == g.multicast.tobytes()
            assert out.unicast.tobytes() == g.unicast.tobytes()
            assert dp.counters == golden.counters


def test_receive_reuses_result_buffers_once_dropped():
    """Results land in pooled buffers: a dropped result's buffer comes back, a kept one does not
    (a caller, or a socket still sending it, holds a reference)."""
    dp = FastDataplane(1, 8, K)
    heads, vals = split_burst(data(0, [0, 1, 2, 3]))
    kept = dp.receive_split_checked(heads, vals, 0, 7)[0]
    before = dp._pool_v.allocated
    for _ in range(5):
        out = dp.receive_split_checked(heads, vals, 0, 7)[0]
        assert not np.shares_memory(out.mc_vals, kept.mc_vals)
        del out
    # Two more (results, retransmission answers: `kept` holds views of both), then the same two.
    assert dp._pool_v.allocated == before + 2
    assert kept.mc_vals[:, 0].tolist() == data(0, [0, 1, 2, 3])["values"][:, 0].tolist()


@pytest.mark.parametrize("layout", ["strided", "misaligned", "read-only"])
def test_receive_compiled_pass_takes_any_layout_with_one_specialization(layout):
    """Strided and misaligned bursts are copied; writable and read-only ones share one compiled
    specialization, the one warm_up loads for interleaved frames (warm_up loads exactly two per
    lane width: interleaved and split; one more would mean a compilation at the switch's first
    burst)."""
    warm_up("fast")
    burst = data(0, [2, 0, 3, 1], values=np.arange(4 * K).reshape(4, K))
    if layout == "strided":
        packets = np.repeat(burst, 2)[::2]
    elif layout == "misaligned":
        raw = np.zeros(burst.nbytes + 1, np.uint8)
        raw[1:] = np.frombuffer(burst.tobytes(), np.uint8)
        packets = raw[1:].view(packet_dtype(K))
    else:
        packets, _ = parse_burst(burst.tobytes(), K)
    rows = _dataplane._rows(packets, packet_dtype(K).itemsize // 4)
    assert rows.flags.aligned and not rows.flags.writeable
    golden, compiled, _ = pair(1, 4, K)
    assert compiled.receive(packets, 0).multicast.tobytes() == \
        golden.receive(burst, 0).multicast.tobytes()
    assert len(_dataplane._compiled().receive_rows.signatures) == 2 * len(LANE_BITS)


def test_warm_up_loads_the_compiled_pass():
    assert warm_up("fast") is True
    assert warm_up("golden") is False


def test_compiled_pass_compiles_without_a_writable_cache(monkeypatch):
    """Where numba finds no writable cache folder, `cache=True` raises at decoration time; the
    module must then warn and compile in memory instead of failing the switch's start."""
    jit = _dataplane._compiled()
    real = jit.njit

    def no_cache_folder(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real(**options)

    monkeypatch.setattr(jit, "njit", no_cache_folder)

    def double(x):
        return 2 * x

    monkeypatch.setattr(jit, "_uncached", [])
    with pytest.warns(RuntimeWarning, match="NUMBA_CACHE_DIR"):
        compiled = jit._njit(double)
    assert compiled(21) == 42 and compiled._cache.__class__.__name__ == "NullCache"
