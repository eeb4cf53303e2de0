"""The sans-IO client machine (switchagg._stream), joined to the switch's dataplane in memory."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from fakelink import JOB_ID, FakeNetwork, dataplane_factories
from switchagg._stream import PROBE_BACKOFFS, RtoEstimator, StreamMachine, array_fill
from switchagg.packet import MAGIC, Kind, empty_burst, make_burst, packet_bytes, split_burst

K, S, B = 8, 16, 4
LENGTHS = [0, 1, K - 1, K, K + 1, S * K, 3 * S * K + 5]
DATAPLANES = dataplane_factories()
LOSSY = dict(drop=0.1, duplicate=0.05, reorder=0.1)


def wrapping_sum(inputs: list[np.ndarray]) -> np.ndarray:
    """The int32 sum with two's-complement wrap-around, computed exactly in int64."""
    total = np.zeros(len(inputs[0]), np.int64)
    for x in inputs:
        total += x
    return total.astype(np.int32)  # truncation to the low 32 bits = wrap-around


def extreme_inputs(rng: np.random.Generator, n: int, numel: int) -> list[np.ndarray]:
    """Values all over the int32 range, with runs at the limits, so the sums wrap."""
    out = []
    for _ in range(n):
        x = rng.integers(-2**31, 2**31, numel, dtype=np.int64).astype(np.int32)
        x[::3] = np.iinfo(np.int32).max
        x[1::5] = np.iinfo(np.int32).min
        out.append(x)
    return out


@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
@pytest.mark.parametrize("impaired", [False, True], ids=["clean", "lossy"])
@pytest.mark.parametrize("numel", LENGTHS)
def test_allreduce_is_exact_wrapping_sum(dataplane, impaired, numel):
    net = FakeNetwork(3, k=K, slots=S, burst=B, dataplane=DATAPLANES[dataplane], seed=numel,
                      **(LOSSY if impaired else {}))
    inputs = extreme_inputs(np.random.default_rng(numel), 3, numel)
    copies = [x.copy() for x in inputs]
    results = net.allreduce(inputs)
    expected = wrapping_sum(inputs)
    for r in results:
        assert r.dtype == np.int32 and r.shape == (numel,)
        np.testing.assert_array_equal(r, expected)
    for x, c in zip(inputs, copies):
        np.testing.assert_array_equal(x, c)  # inputs are not modified


@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_many_calls_under_loss_stay_exact_and_recover(dataplane):
    net = FakeNetwork(4, k=K, slots=S, burst=B, dataplane=DATAPLANES[dataplane], seed=1, **LOSSY)
    rng = np.random.default_rng(2)
    for numel in rng.integers(0, 3 * S * K, 40):
        inputs = extreme_inputs(rng, 4, int(numel))
        for r in net.allreduce(inputs):
            np.testing.assert_array_equal(r, wrapping_sum(inputs))
    totals = [c.counters for c in net.clients]
    assert sum(c.retransmitted for c in totals) > 0
    assert sum(c.timeouts for c in totals) > 0
    assert sum(c.duplicates_ignored for c in totals) > 0  # duplicated or re-answered results
    assert all(c.malformed == {} for c in totals)
    assert net.switch.counters.retransmissions_answered > 0


def test_calls_queued_back_to_back_share_bursts_and_stay_exact():
    net = FakeNetwork(2, k=K, slots=S, burst=B, seed=3, drop=0.05)
    rng = np.random.default_rng(3)
    sizes = [5, 0, K * 3 + 1, 1, S * K * 2, 7]
    inputs = [[rng.integers(-9, 9, n).astype(np.int32) for n in sizes] for _ in range(2)]
    calls = [[c.submit(len(x), array_fill(x, K), net.now) for x in xs]
             for c, xs in zip(net.clients, inputs)]
    net.run([call for per_rank in calls for call in per_rank])
    for i, n in enumerate(sizes):
        expected = inputs[0][i] + inputs[1][i]
        for rank in range(2):
            np.testing.assert_array_equal(calls[rank][i].result(), expected)


def test_chunk_counter_runs_on_so_versions_alternate_across_calls():
    net = FakeNetwork(2, k=K, slots=S, burst=B, seed=4)
    seen = []
    post = net._post

    def spy(direction, rank, packets):
        if direction == "up" and rank == 0:
            seen.append(packets[["pool_index", "chunk"]].copy())
        post(direction, rank, packets)

    net._post = spy
    numel = (S + 3) * K  # 19 chunks per call: not a multiple of s
    for _ in range(3):
        net.allreduce([np.ones(numel, np.int32)] * 2)
    headers = np.concatenate(seen)
    chunk, pool = headers["chunk"].astype(np.int64), headers["pool_index"].astype(np.int64)
    assert sorted(set(chunk)) == list(range(3 * (S + 3)))  # one counter across the calls
    np.testing.assert_array_equal(pool & 0x7FFF, chunk % S)
    np.testing.assert_array_equal(pool >> 15, (chunk // S) % 2)
    # The second call starts on slot 3 with version 1: it continues where the first ended.
    first_of_second = headers[chunk == S + 3]["pool_index"][0]
    assert (first_of_second & 0x7FFF, first_of_second >> 15) == (3, 1)


def test_window_never_exceeds_slots_and_waits_for_the_result_of_chunk_minus_s():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B)
    call = m.submit(5 * S * K, array_fill(np.arange(5 * S * K, dtype=np.int32), K), 0.0)
    bursts = m.transmit(0.0)
    assert sum(len(b) for b in bursts) == S and all(len(b) == B for b in bursts)
    assert m.transmit(0.001) == []  # window full: nothing until a result frees a slot
    # Results for chunks 1..4 (slot 0's chunk 0 still out) free no slot *in order*: still nothing.
    res = make_burst(Kind.RESULT, JOB_ID, 1, np.arange(1, 5), np.zeros(4), np.arange(1, 5),
                     np.zeros((4, K), np.int32))
    m.receive(res.tobytes(), 0.002)
    assert m.transmit(0.002) == []
    res0 = make_burst(Kind.RESULT, JOB_ID, 1, [0], [0], [0], np.zeros((1, K), np.int32))
    m.receive(res0.tobytes(), 0.003)
    (burst,) = m.transmit(0.003)  # slots 0..4 free -> one full burst of chunks 16..19
    np.testing.assert_array_equal(burst["chunk"], np.arange(S, S + B))
    np.testing.assert_array_equal(burst["pool_index"], 0x8000 | np.arange(B))
    assert call.done == 5


def test_a_window_of_half_the_slots_goes_on_past_a_stuck_chunk_for_half_the_pool():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, window=S // 2)
    m.submit(5 * S * K, array_fill(np.arange(5 * S * K, dtype=np.int32), K), 0.0)
    first = np.concatenate([h[:, 3] for h, _ in m.transmit_frames(0.0)])
    np.testing.assert_array_equal(first, np.arange(S // 2))  # the window, not the pool
    assert m.transmit_frames(0.001) == []
    # Every chunk but 0 answered (chunk 0 is lost): first sends go on into the other half of the
    # pool, window by window, until they reach chunk 0's slot again.
    sent, t = S // 2, 0.002
    while True:
        res = make_burst(Kind.RESULT, JOB_ID, 1, np.arange(1, sent) % S, (np.arange(1, sent) // S) % 2,
                         np.arange(1, sent), np.zeros((sent - 1, K), np.int32))
        m.receive(res.tobytes(), t)
        frames = [h for h, _ in m.transmit_frames(t) if not (h[:, 3] == 0).any()]  # not resends
        if not frames:
            break
        chunks = np.concatenate([h[:, 3] for h in frames])
        np.testing.assert_array_equal(chunks, np.arange(sent, sent + len(chunks)))
        assert m._outstanding <= S // 2
        sent += len(chunks)
        t += 0.001
    assert sent == S  # chunk S needs slot 0: it waits for chunk 0's answer, as with any window


def test_window_must_hold_a_burst_and_fit_the_pool():
    for window in (B - 1, S + 1):
        with pytest.raises(ValueError, match="window"):
            StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, window=window)


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_late_duplicates_and_results_of_other_chunks_are_ignored(compiled):
    # With numba, late answers arriving while no call is pending take the compiled pass too.
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, compiled=compiled)
    call = m.submit(2 * K, array_fill(np.zeros(2 * K, np.int32), K), 0.0)
    m.transmit(0.0)
    res = make_burst(Kind.RESULT, JOB_ID, 1, [0, 0, 1], [0, 0, 0], [0, 0, 1],
                     np.full((3, K), 5, np.int32))
    assert m.receive(res.tobytes(), 0.01) == [call]  # a duplicate within the frame is dropped
    assert m.counters.duplicates_ignored == 1
    m.receive(res.tobytes(), 0.02)  # the whole frame again, after completion
    assert m.counters.duplicates_ignored == 4 and m.counters.results == 2
    bad = res.copy()
    bad["magic"][1] = 0  # still checked with no call pending: counted, never taken
    m.receive(bad.tobytes(), 0.025)
    assert m.counters.duplicates_ignored == 6 and m.counters.malformed == {"bad_magic": 1}
    # A result naming the right slot but another chunk (an older call's) is not taken either.
    m.submit(K, array_fill(np.zeros(K, np.int32), K), 0.03)
    m.transmit(0.03)  # chunk 2 on slot 2
    stale = make_burst(Kind.RESULT, JOB_ID, 1, [2], [1], [2 + S], np.ones((1, K), np.int32))
    m.receive(stale.tobytes(), 0.04)
    assert m.counters.duplicates_ignored == 7 and m.busy
    np.testing.assert_array_equal(call.result(), np.full(2 * K, 5))


def test_malformed_frames_are_counted_never_raised():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B)
    m.submit(K, array_fill(np.zeros(K, np.int32), K), 0.0)
    m.transmit(0.0)
    good = make_burst(Kind.RESULT, JOB_ID, 1, [0], [0], [0], np.ones((1, K), np.int32))
    bad = np.concatenate([good] * 6)
    bad["magic"][0] = MAGIC ^ 1
    bad["kind"][1] = Kind.DATA
    bad["job"][2] = JOB_ID + 1
    bad["pool_index"][3] = S
    bad["reserved"][4] = 1
    m.receive(bad.tobytes() + b"xyz", 0.01)  # five bad packets, one good, a truncated tail
    assert m.counters.malformed == {"truncated": 1, "bad_magic": 1, "bad_kind": 1, "bad_job": 1,
                                    "bad_slot": 1, "bad_reserved": 1}
    assert m.counters.results == 1 and not m.busy
    m.receive(b"", 0.02)
    m.receive(b"\x00" * (packet_bytes(K) - 1), 0.02)
    assert m.counters.malformed["truncated"] == 2


def test_timeout_probes_the_oldest_chunk_with_backoff_and_its_answer_proves_nothing_else():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, rto_initial=0.1,
                      rto_min=0.05, rto_max=0.4, tail_resend=0)
    x = np.arange(3 * K, dtype=np.int32)
    m.submit(len(x), array_fill(x, K), 0.0)
    (first,) = m.transmit(0.0)
    first = first.copy()
    assert m.next_deadline() == pytest.approx(0.1)
    assert m.transmit(0.099) == []
    now, rtos = 0.1, []
    for _ in range(4):
        (probe,) = m.transmit(now)  # one packet: the oldest outstanding chunk, resent identical
        assert probe.tobytes() == first[:1].tobytes()
        rtos.append(m.rto.rto)
        now = m.next_deadline()
    assert rtos == [0.2, 0.4, 0.4, 0.4]  # doubled, capped at rto_max
    assert m.counters.timeouts == 4 and m.counters.retransmitted == 4
    # The probe is answered (here by the shadow copy: its first result was lost). An answer to
    # a resent chunk may come from another worker's packet completing the slot, so it proves
    # nothing about chunks sent once: chunks 1 and 2 are not resent for it.
    res = make_burst(Kind.RESULT_RETX, JOB_ID, 1, [0], [0], [0], np.zeros((1, K), np.int32))
    m.receive(res.tobytes(), now + 0.01)
    assert m.transmit(now + 0.01) == []
    # Karn's rule: the answer to a resent chunk gives no RTT sample (the RTO stays backed off).
    assert m.rto.srtt is None and m.rto.rto == 0.4 and m.counters.retransmitted == 4


def test_tail_probe_resends_a_short_tail_at_once_and_an_answer_restores_the_rto():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, rto_initial=0.1,
                      rto_min=0.01, rto_max=0.4)
    x = np.arange(3 * K, dtype=np.int32)
    m.submit(len(x), array_fill(x, K), 0.0)
    (first,) = m.transmit(0.0)
    first = first.copy()
    # Chunk 0 is answered (a fresh sample: srtt 0.02), chunks 1 and 2 are lost.
    res = make_burst(Kind.RESULT, JOB_ID, 0, [0], [0], [0], np.zeros((1, K), np.int32))
    m.receive(res.tobytes(), 0.02)
    rto = m.rto.rto
    for _ in range(5):  # the RACK deadline comes first (nothing is lost by time order)
        if probes := m.transmit(m.next_deadline()):
            break
    assert m.counters.timeouts == 1
    assert b"".join(p.tobytes() for p in probes) == first[1:].tobytes()  # the whole tail
    assert m.rto.rto == 2 * rto
    res = make_burst(Kind.RESULT_RETX, JOB_ID, 0, [1], [0], [1], np.zeros((1, K), np.int32))
    m.receive(res.tobytes(), m.next_deadline())
    assert m.rto.rto == rto  # the answer proves the path: back to the measured RTO


def test_a_late_peer_costs_one_probe_packet_per_rto_not_a_window():
    net = FakeNetwork(3, k=K, slots=S, burst=B, seed=8)
    inputs = extreme_inputs(np.random.default_rng(8), 3, 5 * S * K)
    early = [c.submit(len(x), array_fill(x, K), 0.0) for c, x in zip(net.clients[:2], inputs)]
    for _ in range(200):  # ranks 0 and 1 fill their windows; rank 2 starts 0.5 s later
        for rank, client in enumerate(net.clients[:2]):
            for burst in client.transmit(net.now):
                net._post("up", rank, burst)
        net.now = min(d for d in [c.next_deadline() for c in net.clients[:2]] if d) 
        if net.now > 0.5:
            break
        while net._events and net._events[0][0] <= net.now:
            net._deliver(*heapq.heappop(net._events)[2:])
    late = net.clients[2].submit(len(inputs[2]), array_fill(inputs[2], K), net.now)
    net.run(early + [late])
    for call in early + [late]:
        np.testing.assert_array_equal(call.result(), wrapping_sum(inputs))
    for client in net.clients[:2]:
        assert client.counters.retransmitted == client.counters.timeouts <= 6  # probes only
    assert net.clients[2].counters.retransmitted == 0


def test_rto_estimator_follows_rfc6298():
    est = RtoEstimator(initial=1.0, minimum=0.01, maximum=10.0)
    est.sample(0.1)
    assert (est.srtt, est.rttvar) == pytest.approx((0.1, 0.05))
    assert est.rto == pytest.approx(0.1 + 4 * 0.05)
    est.sample(0.2)
    assert est.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)
    assert est.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)
    for _ in range(50):
        est.sample(0.0001)
    assert est.rto == 0.01  # clamped at the minimum
    est.backoff()
    assert est.rto == 0.02


def test_probe_timeout_is_twice_the_rtt_backed_off_at_most_twice_and_never_past_the_rto():
    est = RtoEstimator(initial=1.0, minimum=0.01, maximum=10.0)
    assert est.probe_timeout(0.004) == 0.01          # at least the minimum
    assert est.probe_timeout(0.03) == 0.06           # 2 rtt
    assert est.probe_timeout(2.0) == 1.0             # never longer than the RTO
    est.sample(0.2)
    timeouts = []
    for _ in range(5):
        est.backoff()
        timeouts.append(est.probe_timeout(0.03))
    assert PROBE_BACKOFFS == 2 and timeouts == [0.12, 0.24, 0.24, 0.24, 0.24]
    assert est.rto == 10.0                           # the RTO itself backs off in full
    est.restore()
    assert est.backoffs == 0 and est.probe_timeout(0.03) == 0.06


def test_a_calls_last_chunk_is_probed_after_twice_the_minimum_rtt_not_the_loaded_rto():
    """A call's last chunk has no later answer to be found lost by: the timeout finds it. Under
    load srtt and rttvar measure the bulk bursts' wait in the switch's queue (here 0.2 s, RTO
    over 0.4 s), which a call's tail no longer has: the probe waits 2 min RTT, doubling at most
    twice while unanswered, where the RTO would double from there."""
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, rto_initial=1.0,
                      rto_min=0.01, rto_max=4.0)
    now, g = 0.0, 0
    for rtt in [0.004] + [0.2] * 3:  # one unloaded round trip, then loaded ones
        m.submit(K, array_fill(np.ones(K, np.int32), K), now)
        m.transmit(now)
        now += rtt
        m.receive(_results([g]), now)
        g += 1
    assert m.min_rtt == pytest.approx(0.004) and m.rto.rto > 0.4
    x = np.arange(2 * K, dtype=np.int32)
    call = m.submit(len(x), array_fill(x, K), now)
    (sent,) = m.transmit(now)
    sent = sent.copy()
    m.receive(_results([g]), now + 0.2)  # chunk g + 1, sent with it, is lost: nothing passes it
    now += 0.2
    probes, start = [], now
    while len(probes) < 4:
        now = m.next_deadline()
        if out := m.transmit(now):  # else the RACK deadline: nothing is lost by time order
            (again,) = out
            assert again.tobytes() == sent[1:].tobytes()
            probes.append(round(now - start, 6))
            start = now
    assert probes == [0.01, 0.02, 0.04, 0.04] and m.counters.timeouts == 4
    m.receive(_results([g + 1], Kind.RESULT_RETX), now + 0.004)
    assert call.complete
    np.testing.assert_array_equal(call.result()[:K], 0)  # _results answers zeros


def test_rtt_is_sampled_from_results_of_chunks_sent_once():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B)
    m.submit(K, array_fill(np.zeros(K, np.int32), K), 1.0)
    m.transmit(1.0)
    res = make_burst(Kind.RESULT, JOB_ID, 1, [0], [0], [0], np.zeros((1, K), np.int32))
    m.receive(res.tobytes(), 1.03)
    assert m.rto.srtt == pytest.approx(0.03)


@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_fill_path_returns_max_exponents_and_feeds_them_back_s_chunks_later(dataplane):
    n, numel = 3, (2 * S + 5) * K
    nchunks = -(-numel // K)
    rng = np.random.default_rng(5)
    exps = rng.integers(-20, 20, (n, nchunks)).astype(np.int8)
    values = rng.integers(-1000, 1000, (n, numel)).astype(np.int32)
    fed_back = [np.full(nchunks, 99, np.int8) for _ in range(n)]

    def make_fill(rank):
        def fill(first, stop, returned, values_out, exponents_out):
            fed_back[rank][first:stop] = returned
            array_fill(values[rank], K)(first, stop, returned, values_out, exponents_out)
            exponents_out[:] = exps[rank, first:stop]
        return fill

    net = FakeNetwork(n, k=K, slots=S, burst=B, dataplane=DATAPLANES[dataplane], seed=6, **LOSSY)
    net.allreduce(values[:, :1])  # start the stream mid-pool: chunk numbers do not begin at 0
    calls = net.allreduce_stream(numel, [make_fill(r) for r in range(n)])
    expected_max = exps.max(axis=0)
    for rank, call in enumerate(calls):
        np.testing.assert_array_equal(call.result(), values.sum(axis=0).astype(np.int32))
        np.testing.assert_array_equal(call.exponents, expected_max)
        np.testing.assert_array_equal(fed_back[rank][:S], 0)
        np.testing.assert_array_equal(fed_back[rank][S:], expected_max[:-S])


def test_abandon_drops_calls_and_frees_the_window():
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B)
    call = m.submit(4 * S * K, array_fill(np.zeros(4 * S * K, np.int32), K), 0.0)
    m.transmit(0.0)
    slots, versions, outstanding = m.stuck(limit=3)
    assert (slots, versions, outstanding) == ([0, 1, 2], [0, 0, 0], S)
    assert m.abandon() == [call]
    assert not m.busy and m.next_deadline() is None and m.transmit(1.0) == []


def test_bursts_are_views_of_the_preallocated_ring():
    m = StreamMachine(job_id=JOB_ID, rank=3, k=K, slots=S, burst=B)
    m.submit(S * K, array_fill(np.ones(S * K, np.int32), K), 0.0)
    bursts = m.transmit(0.0)
    assert {int(b["worker"][0]) for b in bursts} == {3}
    assert all((b["kind"] == Kind.DATA).all() and (b["job"] == JOB_ID).all() for b in bursts)
    assert empty_burst(1, K).dtype == bursts[0].dtype


@pytest.mark.parametrize("numel", [S * K, S * K - 3])
def test_payloads_are_sent_straight_from_the_callers_array(numel):
    """Zero copy: a plain all-reduce's whole chunks leave as views of the caller's array (split
    frames: header words from the ring, payloads from the input); only a partial last chunk is
    staged in the ring. Every header is a view of the ring, never a fresh array."""
    m = StreamMachine(job_id=JOB_ID, rank=3, k=K, slots=S, burst=B)
    values = np.arange(numel, dtype=np.int32)
    m.submit(numel, array_fill(values, K), 0.0)
    frames = m.transmit_frames(0.0)
    assert sum(len(h) for h, _ in frames) == S
    for heads, vals in frames:
        assert heads.shape[1] == 4 and vals.shape[1] == K and len(heads) == len(vals)
        assert heads.flags.c_contiguous and vals.flags.c_contiguous
        assert np.shares_memory(heads, m._ring_words)
    whole = numel // K
    direct = [v for _, v in frames if np.shares_memory(v, values)]
    assert sum(len(v) for v in direct) == whole
    if whole < S:  # the partial chunk: staged and zero-padded
        assert not np.shares_memory(frames[-1][1], values)
        assert frames[-1][1][-1].tolist() == list(range(whole * K, numel)) + [0] * (S * K - numel)


def test_resends_copy_payloads_from_the_callers_array():
    """A retransmitted chunk carries the same payload as its first send, also when that payload
    was sent from the caller's array (the timeout probe resends the oldest outstanding chunk)."""
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, rto_initial=0.1,
                      tail_resend=0)
    values = np.arange(S * K, dtype=np.int32) * 3
    m.submit(S * K, array_fill(values, K), 0.0)
    first = m.transmit(0.0)
    (probe,) = m.transmit(0.2)
    assert probe["chunk"].tolist() == [0]
    assert probe.tobytes() == first[0][:1].tobytes()
    assert not np.shares_memory(m.transmit_frames(0.5)[0][1], values)  # a copy, not a view


@pytest.mark.parametrize("numel", [0, 1, K - 1, K, K + 1, 10 * K, 10 * K + 3])
def test_submit_with_out_writes_the_sums_into_it(numel):
    machine = StreamMachine(job_id=0, rank=0, k=K, slots=8, burst=4)
    values = np.arange(numel, dtype=np.int32) - 7
    out = np.full(numel, -1, np.int32)
    call = machine.submit(numel, array_fill(values, K), 0.0, out=out)
    while not call.complete:
        for burst in machine.transmit(1.0):
            result = burst.copy()
            result["kind"] = Kind.RESULT
            machine.receive(result.tobytes(), 1.0)
    assert call.result() is out
    assert np.array_equal(out, values)


def test_reference_path_without_numba_gives_the_same_exact_sums_under_loss():
    net = FakeNetwork(3, k=K, slots=S, burst=B, seed=9, **LOSSY)
    for client in net.clients:
        client._jit = None  # the numpy reference path, as on an install without numba
    rng = np.random.default_rng(9)
    for numel in rng.integers(0, 3 * S * K, 10):
        inputs = extreme_inputs(rng, 3, int(numel))
        for r in net.allreduce(inputs):
            np.testing.assert_array_equal(r, wrapping_sum(inputs))


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_chunk_numbers_wrap_at_2_32_in_headers_and_matching(compiled):
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, compiled=compiled)
    m._next_chunk = (1 << 32) - 2  # as after 2^32 - 2 chunks sent
    x = np.arange(4 * K, dtype=np.int32)
    call = m.submit(len(x), array_fill(x, K), 0.0)
    burst = np.concatenate(m.transmit(0.0))  # cut in two at the end of the ring
    g = np.arange((1 << 32) - 2, (1 << 32) + 2)
    np.testing.assert_array_equal(burst["chunk"], g % (1 << 32))
    np.testing.assert_array_equal(burst["pool_index"], (g % S) | (((g // S) & 1) << 15))
    result = burst.copy()
    result["kind"] = Kind.RESULT
    assert m.receive(result.tobytes(), 0.01) == [call]
    np.testing.assert_array_equal(call.result(), x)


def test_compiled_loss_scan_and_rto_timer_agree_with_numpy_on_random_slot_states():
    rng = np.random.default_rng(5)
    for trial in range(50):
        machines = [StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, compiled=c)
                    for c in (True, False)]
        busy = rng.random(S) < 0.6
        busy[rng.integers(S)] = True
        sent = rng.integers(0, 8, S) / 8  # ties in send time, as a burst's chunks have
        chunk = rng.permutation(S).astype(np.int64)
        rack, rr = int(rng.integers(S)), int(rng.integers(S))
        resent = rng.random(S) < 0.3
        for m in machines:
            m._busy[:], m._sent_at[:], m._chunk[:], m._resent[:] = busy, sent, chunk, resent
            m._outstanding = int(busy.sum())
            m._rack_sent, m._rack_chunk, m._rack_rtt = float(sent[rack]), int(chunk[rack]), 0.1
            m._rr_sent, m._rr_chunk, m._rr_rtt = float(sent[rr]), int(chunk[rr]), 0.05
            m.min_rtt = 0.02 * (trial % 3) if trial % 3 else np.inf
            m._rack_due = -np.inf
        now = float(rng.integers(0, 12) / 8)
        fast, ref = (m._resend_lost(now) for m in machines)
        assert [h.tobytes() + v.tobytes() for h, v in fast] == \
            [h.tobytes() + v.tobytes() for h, v in ref], trial
        assert machines[0]._rack_due == machines[1]._rack_due, trial
        assert machines[0]._rto_deadline() == machines[1]._rto_deadline(), trial


@pytest.mark.parametrize("compiled", [True, False])
def test_split_frames_carry_the_call_byte_on_first_sends_and_resends(compiled):
    """Every header the split path sends, from the caller's array, from the staging rows (a
    partial chunk), and as a resend, carries its call's number mod 256 in the call byte."""
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, rto_initial=0.1,
                      compiled=compiled)
    numel = 2 * K + 3  # two whole chunks sent from the array, one partial from the staging
    m.submit(numel, array_fill(np.arange(numel, dtype=np.int32), K), 0.0, seq=300)
    m.submit(K, array_fill(np.ones(K, np.int32), K), 0.0)  # seq 301, after the first call
    first = m.transmit_frames(0.0)
    heads = np.concatenate([h for h, _ in first])
    calls = (heads[:, 2] >> 24) & 0xFF
    assert calls.tolist() == [300 % 256] * 3 + [301 % 256]
    resent = m.transmit_frames(0.5)  # the tail probe: every outstanding chunk again
    heads = np.concatenate([h for h, _ in resent])
    assert sorted(((heads[:, 2] >> 24) & 0xFF).tolist()) == [44, 44, 44, 45]


def test_split_results_at_odd_addresses_take_the_compiled_pass(monkeypatch):
    # libzmq hands small messages out of a shared receive buffer at any byte offset.
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B)
    x = np.arange(3 * K, dtype=np.int32)
    call = m.submit(len(x), array_fill(x, K), 0.0)
    m.transmit_frames(0.0)
    res = make_burst(Kind.RESULT, JOB_ID, 1, [0, 1, 2], [0, 0, 0], [0, 1, 2], 2 * x.reshape(3, K))
    heads, vals = split_burst(res)
    raw = bytearray(1 + heads.nbytes + vals.nbytes)
    raw[1:1 + heads.nbytes], raw[1 + heads.nbytes:] = heads.tobytes(), vals.tobytes()
    view = memoryview(raw)
    monkeypatch.setattr(m, "_receive_reference", lambda *a: pytest.fail("took the numpy path"))
    assert m.receive_split(view[1:1 + heads.nbytes], view[1 + heads.nbytes:], 0.01) == [call]
    np.testing.assert_array_equal(call.result(), 2 * x)


# ---- loss recovery that keeps its pace -----------------------------------------------------

def _results(chunks, kind=Kind.RESULT) -> bytes:
    chunks = np.asarray(chunks)
    return make_burst(kind, JOB_ID, 1, chunks % S, (chunks // S) % 2, chunks,
                      np.zeros((len(chunks), K), np.int32)).tobytes()


def _machine(**kw) -> tuple[StreamMachine, np.ndarray]:
    """A machine with 8 chunks (two bursts) sent at t = 0; returns it and the packets sent."""
    m = StreamMachine(job_id=JOB_ID, rank=0, k=K, slots=S, burst=B, rto_initial=1.0,
                      rto_min=0.01, rto_max=2.0, **kw)
    x = np.arange(8 * K, dtype=np.int32)
    m.submit(len(x), array_fill(x, K), 0.0)
    sent = np.concatenate([b.copy() for b in m.transmit(0.0)])
    assert len(sent) == 8
    return m, sent


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_a_gap_is_resent_before_the_rto(compiled):
    """Results for later chunks and none for chunk 0 (a SACK-like gap): chunk 0 is resent once
    the answer's RTT plus the reordering window (min RTT / 4) has passed, long before the RTO."""
    m, sent = _machine(compiled=compiled)
    m.receive(_results(range(1, 8)), 0.02)
    assert m.transmit(0.02) == []  # seen, not due yet
    rto_deadline = 0.02 + m.rto.rto
    assert m.next_deadline() == pytest.approx(0.025) and 0.025 < rto_deadline
    assert m.transmit(0.0249) == []
    (again,) = m.transmit(0.025)
    assert again.tobytes() == sent[:1].tobytes()
    assert m.counters.timeouts == 0 and m.counters.retransmitted == 1


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_answers_to_resent_chunks_never_mark_chunks_sent_once_lost(compiled):
    """Another worker's resend may complete a slot long before ours reaches the switch: such an
    answer says nothing about our chunks sent once, still queued behind it (the old rule resent
    whole bursts for it: 45% of packets resent at 1% loss)."""
    m, sent = _machine(compiled=compiled)
    m.receive(_results(range(1, 4)), 0.02)
    (again,) = m.transmit(0.025)
    assert again["chunk"].tolist() == [0]
    m.receive(_results([0]), 0.027)  # its answer, 2 ms after the resend
    assert m.transmit(0.027) == []
    deadline = m.next_deadline()
    assert deadline > 0.027 + 0.01  # no RACK deadline left: only the RTO
    assert m.transmit(deadline - 1e-6) == []  # chunks 4..7 (sent once) are not resent
    assert m.counters.retransmitted == 1


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_a_lost_resend_is_found_by_a_later_resends_answer_before_the_rto(compiled):
    m, sent = _machine(compiled=compiled)
    m.receive(_results(range(2, 8)), 0.02)
    (again,) = m.transmit(0.025)
    assert again["chunk"].tolist() == [0, 1]  # one frame, oldest first
    m.receive(_results([1]), 0.04)  # chunk 1's resend answered, chunk 0's (sent with it) not
    assert m.transmit(0.04) == []
    # Lost again after max(its RTT, min RTT) + rto_min: 0.025 + 0.02 + 0.01.
    assert m.next_deadline() == pytest.approx(0.055)
    assert m.next_deadline() < 0.04 + m.rto.rto
    (third,) = m.transmit(0.055)
    assert third.tobytes() == sent[:1].tobytes() and m.counters.timeouts == 0


@pytest.mark.parametrize("kind", [Kind.RESULT, Kind.RESULT_RETX])
def test_duplicate_results_do_not_confuse_the_fast_retransmit(kind):
    """Duplicated results (in one frame, or the whole frame again) are counted and ignored:
    they neither mark later chunks lost nor give RTT samples."""
    m, sent = _machine()
    m.receive(_results([0, 1, 2, 3, 3], kind), 0.02)
    srtt = m.rto.srtt
    m.receive(_results([0, 1, 2, 3], kind), 0.03)
    assert m.transmit(0.03) == []
    assert m.counters.duplicates_ignored == 5 and m.rto.srtt == srtt
    deadline = m.next_deadline()
    assert m.transmit(deadline - 1e-6) == []  # chunks 4..7 come after every answer: not a gap
    m.receive(_results(range(4, 8), kind), deadline - 1e-6)
    assert not m.busy and m.counters.retransmitted == 0


def test_rto_returns_to_the_measured_rtt_after_a_loss_burst():
    """A stretch of total loss backs the RTO off; the first answers after it bring it back to
    srtt + 4 rttvar (Karn's rule keeps resent chunks out of the samples, so the estimate is
    still the clean path's)."""
    net = FakeNetwork(3, k=K, slots=S, burst=B, seed=11)
    rng = np.random.default_rng(11)
    inputs = extreme_inputs(rng, 3, 3 * S * K)
    net.allreduce(inputs)
    measured = [c.rto.rto for c in net.clients]
    net.drop = 1.0  # the link goes dark
    calls = [c.submit(len(x), array_fill(x, K), net.now) for c, x in zip(net.clients, inputs)]
    with pytest.raises(AssertionError, match="pending"):
        net.run(calls, max_steps=60)
    assert all(c.counters.timeouts >= 3 for c in net.clients)
    assert all(c.rto.rto >= 4 * m for c, m in zip(net.clients, measured))  # backed off
    net.drop = 0.0
    net.run(calls)
    for call in calls:
        np.testing.assert_array_equal(call.result(), wrapping_sum(inputs))
    for c, m in zip(net.clients, measured):
        assert c.rto.rto == pytest.approx(m)


@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_under_light_loss_only_lost_chunks_are_resent(dataplane):
    """At 2% loss each way with 4 workers a chunk needs a resend from this worker when its own
    packet or its result was lost (about 4%), and is resent uselessly when another worker's
    was (about 6%): far from the whole bursts resent before."""
    net = FakeNetwork(4, k=K, slots=S, burst=B, dataplane=DATAPLANES[dataplane], seed=12,
                      drop=0.02)
    rng = np.random.default_rng(12)
    for _ in range(10):
        inputs = extreme_inputs(rng, 4, 5 * S * K)
        for r in net.allreduce(inputs):
            np.testing.assert_array_equal(r, wrapping_sum(inputs))
    sent = sum(c.counters.chunks_sent for c in net.clients)
    resent = sum(c.counters.retransmitted for c in net.clients)
    assert 0 < resent < 0.2 * sent, (resent, sent)


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_a_gap_keeps_its_deadline_while_later_chunks_sent_with_it_are_answered(compiled):
    """Chunks sent together are answered one after another as the switch works through them;
    each later answer has a longer RTT. The gap's deadline runs from when it was first passed,
    so the stream of later answers cannot push its resend back (RACK's rule alone would)."""
    m, sent = _machine(compiled=compiled)
    m.receive(_results(range(1, 4)), 0.010)
    assert m.transmit(0.010) == []  # chunk 0 passed at 0.010; window min RTT / 4 = 0.0025
    m.receive(_results(range(4, 8)), 0.012)  # RTT 0.012: RACK alone would wait until 0.0145
    assert m.transmit(0.012) == []
    assert m.next_deadline() == pytest.approx(0.0125)
    (again,) = m.transmit(0.0125)
    assert again.tobytes() == sent[:1].tobytes()
