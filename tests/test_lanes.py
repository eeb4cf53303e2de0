"""Lanes of 8, 16 or 32 bits per job: the wire, every dataplane against the golden model, the
control plane's JOIN rules, the client's range check, the budget against the lanes, and the
whole stack end to end (a real switch, with and without pipes; `switchagg compare` int8)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, run_clients
from fakelink import FakeNetwork, dataplane_factories
from switch_emulator._config import ConfigError, SwitchConfig
from switch_emulator._dataplane import SplitOutput
from switch_emulator._golden import GoldenDataplane
from switch_emulator._jobs import ControlPlane, ErrorCode
from switch_emulator.dataplane import DataplaneOutput, FastDataplane, make_dataplane
from switchagg._stream import pack_lanes
from switchagg.packet import (FLAG_WRAPPED, HEADER_BYTES, LANE_BITS, Kind, join_split, lane_range,
                              make_burst, packet_bytes, packet_dtype, parse_burst, parse_split,
                              split_burst, validate_burst)
from switchagg.protocol import Error, Join, JoinOk, decode_control, encode_control
from switchagg.errors import ProtocolError
from switchagg.scaling import budget_for_lanes

NARROW = (8, 16)


def wrap(x: np.ndarray, bits: int) -> np.ndarray:
    """The exact int64 values wrapped to `bits` (two's complement), as int32."""
    half = 1 << (bits - 1)
    return (((np.asarray(x, np.int64) + half) % (2 * half)) - half).astype(np.int32)


def lanes_of(rng, shape, bits: int) -> np.ndarray:
    lo, hi = lane_range(bits)
    return rng.integers(lo, hi + 1, shape, dtype=np.int64).astype(np.int32)


# ---------------------------------------------------------------------------------- the wire


@pytest.mark.parametrize("bits", LANE_BITS)
def test_packet_bytes_are_header_plus_k_lanes(bits):
    for k in (8, 64, 1024):
        assert packet_bytes(k, bits) == HEADER_BYTES + k * bits // 8 == packet_dtype(k, bits).itemsize
    assert packet_bytes(64) == packet_bytes(64, 32) == 272  # the int32 layout is unchanged


@pytest.mark.parametrize("bits", LANE_BITS)
def test_bursts_round_trip_both_layouts_at_every_width(bits):
    rng = np.random.default_rng(bits)
    values = lanes_of(rng, (5, 8), bits)
    burst = make_burst(Kind.DATA, 3, 1, np.arange(5), np.zeros(5), np.arange(5), values, k=8,
                       lane_bits=bits)
    parsed, trailing = parse_burst(burst.tobytes(), 8, bits)
    assert trailing == 0 and parsed["values"].tolist() == values.tolist()
    heads, vals = split_burst(burst)
    assert vals.dtype.itemsize * 8 == bits and heads.shape == (5, 4)
    assert join_split(heads, vals, 8).tobytes() == burst.tobytes()
    h, v, bad = parse_split(heads.tobytes(), vals.tobytes(), 8, bits)
    assert bad is None and v.tolist() == values.tolist()


@pytest.mark.parametrize("bits", NARROW)
def test_a_packet_of_another_width_is_truncated_not_misread(bits):
    """Packets sized for 32-bit lanes sent to an 8- or 16-bit job: a trailing partial packet in
    an interleaved frame, a refused split message (both counted as truncated)."""
    wide = make_burst(Kind.DATA, 3, 1, np.arange(3), np.zeros(3), np.arange(3),
                      np.ones((3, 8), np.int32), k=8)
    _, trailing = parse_burst(wide.tobytes()[:packet_bytes(8, 32) + 4], 8, bits)
    assert trailing
    heads, vals = split_burst(wide)
    assert parse_split(heads.tobytes(), vals.tobytes(), 8, bits)[2] == "truncated"


def test_join_names_its_lane_width_and_join_ok_echoes_it():
    join = Join("j", 2, 8, 16, lane_bits=8)
    assert decode_control(encode_control(join)) == join
    assert Join("j", 2, 8, 16).lane_bits is None   # the switch's default
    ok = JoinOk("j", 1, 0, 2, 8, 16, 0.1, 1.0, lane_bits=16)
    assert decode_control(encode_control(ok)).lane_bits == 16
    for bad in (4, 24, 64, True, "8"):
        with pytest.raises(ProtocolError) as info:
            Join("j", 2, 8, 16, lane_bits=bad)
        assert info.value.field == "lane_bits"


# ------------------------------------------------------------------ dataplanes vs the golden model


def planes(n: int, s: int, k: int, bits: int):
    return (GoldenDataplane(n, s, k, lane_bits=bits), FastDataplane(n, s, k, lane_bits=bits),
            FastDataplane(n, s, k, compiled=False, lane_bits=bits))


@pytest.mark.parametrize("bits", LANE_BITS)
def test_adding_past_the_lane_wraps_and_is_flagged(bits):
    """127 + 1 = -128 in 8-bit lanes (32767 + 1 in 16-bit ones, 2^31 - 1 + 1 in int32)."""
    lo, hi = lane_range(bits)
    for dp in planes(2, 4, 8, bits) + (make_dataplane("fast", 2, 4, 8, lane_bits=bits),):
        first = make_burst(Kind.DATA, 0, 0, [0, 1], [0, 0], [0, 1],
                           [[hi] * 8, [hi - 1] * 8], k=8, lane_bits=bits)
        second = make_burst(Kind.DATA, 0, 1, [0, 1], [0, 0], [0, 1], [[1] * 8, [1] * 8], k=8,
                            lane_bits=bits)
        dp.receive(first, 0)
        out = dp.receive(second, 1).multicast
        assert out["values"][0].tolist() == [lo] * 8 and out["values"][1].tolist() == [hi] * 8
        assert out["flags"].tolist() == [FLAG_WRAPPED, 0]
        assert dp.counters.wraps == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from(LANE_BITS), n=st.integers(1, 4), s=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_every_dataplane_equals_golden_at_every_width(bits, n, s, seed):
    """Random bursts (scattered and repeated slots, retransmissions, full-range values so that
    sums wrap at the lane width, spoiled headers): the compiled pass (interleaved and split) and
    the numpy path give the golden model's bytes and counters."""
    rng = np.random.default_rng(seed)
    golden, compiled, vectorized = planes(n, s, 8, bits)
    split_compiled = FastDataplane(n, s, 8, lane_bits=bits)
    split_vectorized = FastDataplane(n, s, 8, compiled=False, lane_bits=bits)
    for _ in range(25):
        worker, size = int(rng.integers(n)), int(rng.integers(0, 12))
        burst = make_burst(Kind.DATA, 5, worker, rng.integers(0, s, size),
                           rng.integers(0, 2, size), rng.integers(0, 6, size),
                           lanes_of(rng, (size, 8), bits), rng.integers(-128, 128, size), k=8,
                           lane_bits=bits)
        for field, bad in (("job", 6), ("worker", worker + 1), ("pool_index", s)):
            burst[field][rng.random(size) < 0.05] = bad
        ok, expected_bad = validate_burst(burst, kind=Kind.DATA, job=5, worker=worker, slots=s)
        g = golden.receive(burst[ok], worker)
        for dp in (compiled, vectorized):
            out, bad = dp.receive_checked(burst.copy(), worker, 5)
            assert bad == expected_bad
            assert out.multicast.tobytes() == g.multicast.tobytes()
            assert out.unicast.tobytes() == g.unicast.tobytes()
            assert dp.counters == golden.counters
        heads, vals = split_burst(burst)
        heads.flags.writeable = vals.flags.writeable = False
        for dp in (split_compiled, split_vectorized):
            out, bad = dp.receive_split_checked(heads, vals, worker, 5)
            assert bad == expected_bad
            if isinstance(out, SplitOutput):
                out = DataplaneOutput(join_split(out.mc_heads, out.mc_vals, 8),
                                      join_split(out.uc_heads, out.uc_vals, 8))
            assert out.multicast.tobytes() == g.multicast.tobytes()
            assert out.unicast.tobytes() == g.unicast.tobytes()
            assert dp.counters == golden.counters


@pytest.mark.parametrize("name", sorted(dataplane_factories()))
@pytest.mark.parametrize("bits", NARROW)
def test_stream_machines_get_the_wrapped_sum_over_a_lossy_link(name, bits):
    """The sans-IO client over a lossy, duplicating, reordering link: int32 in, the exact sum
    wrapped to the lanes and sign-extended out, a quarter (half) of the payload bytes."""
    rng = np.random.default_rng(bits)
    inputs = [lanes_of(rng, 300, bits) for _ in range(3)]
    net = FakeNetwork(3, dataplane=dataplane_factories()[name], drop=0.1, duplicate=0.1,
                      reorder=0.2, seed=bits, lane_bits=bits)
    for result in net.allreduce(inputs):
        assert result.dtype == np.int32
        np.testing.assert_array_equal(result, wrap(np.sum(inputs, axis=0, dtype=np.int64), bits))
    assert net.clients[0].counters.wraps > 0


def test_a_fill_that_writes_past_the_lanes_is_refused_not_truncated():
    """Streaming calls (the heuristic's look-ahead fills) write int32 that is checked and packed
    into the lanes before it leaves; a value outside them raises."""
    def fill(value):
        def write(first, stop, returned, values_out, exponents_out):
            values_out[:] = value
            exponents_out[:] = 3
        return write

    net = FakeNetwork(2, lane_bits=8)
    calls = net.allreduce_stream(20, [fill(100), fill(27)])
    assert [c.result().tolist() for c in calls] == [[127] * 20] * 2
    assert calls[0].exponents.tolist() == [3] * 3
    net = FakeNetwork(2, lane_bits=8)
    with pytest.raises(ValueError, match="value 128 .*8-bit lanes"):
        net.allreduce_stream(20, [fill(128), fill(0)])


def test_pack_lanes_refuses_values_outside_the_lanes():
    assert pack_lanes(np.array([-128, 127], np.int32), 8).dtype == np.int8
    with pytest.raises(ValueError, match=r"value 128 \(element 1\).*8-bit lanes \[-128, 127\]"):
        pack_lanes(np.array([0, 128, 5], np.int32), 8)
    with pytest.raises(ValueError, match=r"-32769.*16-bit"):
        pack_lanes(np.array([-32769], np.int32), 16)


# --------------------------------------------------------------------- the control plane


def test_join_with_another_lane_width_is_refused_like_another_world_size():
    cp = ControlPlane(1024, 0.5, 3.0, GoldenDataplane)
    ok = cp.on_message(b"a", Join("j", 2, 8, 16, lane_bits=8), 0.0)[0][1]
    assert isinstance(ok, JoinOk) and ok.lane_bits == 8
    assert cp.by_name["j"].dataplane.lane_bits == 8
    for other in (16, None):  # None: the switch's default, 32
        err = cp.on_message(b"b", Join("j", 2, 8, 16, lane_bits=other), 0.0)[0][1]
        assert isinstance(err, Error) and err.code == ErrorCode.MISMATCH
        assert err.field == "lane_bits" and "lane_bits=8" in err.message
    ok = cp.on_message(b"b", Join("j", 2, 8, 16, lane_bits=8), 0.0)[0][1]
    assert isinstance(ok, JoinOk) and ok.lane_bits == 8


def test_switch_default_lane_width_serves_joins_that_name_none():
    cp = ControlPlane(1024, 0.5, 3.0, GoldenDataplane, lane_bits=16)
    ok = cp.on_message(b"a", Join("j", 1, 8, 16), 0.0)[0][1]
    assert ok.lane_bits == 16 and cp.by_name["j"].stats()["lane_bits"] == 16
    assert SwitchConfig().lane_bits == 32
    with pytest.raises(ConfigError, match="lane_bits"):
        SwitchConfig(lane_bits=12)


# ------------------------------------------------------------------------ the budget


def test_budget_follows_the_lanes_and_is_never_wider():
    assert budget_for_lanes(None, None) == 32
    assert budget_for_lanes(None, 8) == 8
    assert budget_for_lanes(8, None) == 8       # an int8 budget in int32 lanes, as before
    assert budget_for_lanes(8, 16) == 8
    with pytest.raises(ValueError, match=r"16 bits.*wider than the job's 8-bit lanes"):
        budget_for_lanes(16, 8)


def test_hook_state_refuses_a_budget_wider_than_its_lanes():
    from switchagg.ddp import hook_for
    with pytest.raises(ValueError, match=r"bits=32.*8-bit lanes"):
        hook_for("intsgd-random", switch=None, world_size=2, rank=0, bits=32, lane_bits=8)
    state, _ = hook_for("intsgd-random", switch=None, world_size=2, rank=0, lane_bits=8)
    assert (state.bits, state.lane_bits) == (8, 8) and state.codec.hi == 63


@pytest.mark.parametrize("command", ["compare", "worker"])
def test_a_budget_wider_than_the_lanes_is_refused_before_work(command, capsys):
    from switchagg.workers import cli
    argv = [command, "--lane-bits", "8", "--bits", "16", "--methods", "sgd"]
    if command == "worker":
        argv += ["--rank", "0", "--world-size", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"switchagg {command}: error: --bits 16") and "8-bit lanes" in err


def test_bench_lane_bits_is_checked_before_start(capsys):
    from switchagg.workers import cli
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--lane-bits", "12"])
    assert info.value.code == 2 and "--lane-bits" in capsys.readouterr().err


def test_bench_inputs_span_the_lanes_and_sums_wrap_there():
    from switchagg.workers._bench_workers import bench_input, expected_sum
    x = bench_input(1, 4096, 8)
    lo, hi = lane_range(8)
    assert x.dtype == np.int32 and x.min() == lo and x.max() == hi
    total = np.sum([bench_input(r, 4096, 8) for r in range(3)], axis=0, dtype=np.int64)
    np.testing.assert_array_equal(expected_sum(3, 4096, 8), wrap(total, 8))
    np.testing.assert_array_equal(bench_input(2, 100), bench_input(2, 100, 32))


# -------------------------------------------------------------- end to end, a real switch


@pytest.fixture
def switch(switch_thread):
    """Start switches in threads (their pipes are real processes); stopped at the end."""
    return lambda **config: switch_thread(log_level="WARNING", **config)


def _workers(endpoint: str, job: str, n: int, body, lane_bits):
    from switchagg import ClientConfig
    config = ClientConfig(k=8, slots=64, burst=8, join_timeout=30, op_timeout=15, rto_min=0.01)
    return run_clients(endpoint, job, n, body, config, lane_bits=lane_bits)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipes", [1, 2])
def test_switch_allreduce_in_8_and_16_bit_lanes(switch, pipes):
    server = switch(pipes=pipes, lane_bits=16)
    rng = np.random.default_rng(pipes)
    sizes = [1, 8, 1000]
    for bits in (8, 16, None):  # None: the switch's default (16 here)
        width = bits or 16
        inputs = {(r, i): lanes_of(rng, n, width) for r in range(3) for i, n in enumerate(sizes)}

        def body(client, rank):
            assert client.lane_bits == width
            before = client.stats().bytes_sent
            sums = [client.allreduce(inputs[(rank, i)]) for i in range(len(sizes))]
            with pytest.raises(ValueError, match=f"does not fit the job's {width}-bit lanes"):
                client.allreduce(np.array([0, 1 << (width - 1)], np.int32))
            return sums, client.stats().bytes_sent - before, client.stats().wraps

        results, errors = _workers(server.endpoint, f"lanes-{bits}", 3, body, bits)
        assert not errors, errors
        chunks = sum(-(-n // 8) for n in sizes)
        for sums, sent, wraps in results:
            for i in range(len(sizes)):
                total = sum(inputs[(r, i)].astype(np.int64) for r in range(3))
                np.testing.assert_array_equal(sums[i], wrap(total, width))
                assert sums[i].dtype == np.int32
            # Real packet bytes: whole packets of 16 + 8 * width / 8 bytes, each chunk at least once.
            assert sent % packet_bytes(8, width) == 0 and sent >= chunks * packet_bytes(8, width)
            assert wraps > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_switch_refuses_a_worker_joining_with_other_lanes(switch):
    from switchagg import ClientConfig, JoinRejected, SwitchClient
    server = switch()
    config = ClientConfig(k=8, slots=64, burst=8, join_timeout=30)
    sums = []

    def rank(r: int) -> None:
        with SwitchClient(server.endpoint, "mixed", 2, rank=r, config=config, lane_bits=8) as c:
            sums.append(c.allreduce(np.full(8, 100, np.int32)))

    first = threading.Thread(target=rank, args=(0,))
    first.start()
    while "mixed" not in server.control.by_name:  # rank 0 (8-bit lanes) created the job
        first.join(0.05)
    with pytest.raises(JoinRejected, match="lane_bits=16 disagrees") as info:
        SwitchClient(server.endpoint, "mixed", 2, rank=1, lane_bits=16, config=config)
    assert info.value.field == "lane_bits"
    rank(1)  # the same width joins; the job runs (100 + 100 wraps 8-bit lanes: -56)
    first.join(30)
    assert [s.tolist() for s in sums] == [[-56] * 8] * 2


# ------------------------------------------------------------------ compare, int8 lanes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_in_8_bit_lanes_never_wraps_and_sends_a_quarter(tmp_path):
    """The int8 run at small size: 4 workers, 8-bit lanes (the budget follows: 8 bits), IntSGD
    (its first step included) and the heuristic never wrap; the bytes are the real packets."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "switchagg.workers.cli", "compare", "--workers", "4", "--lane-bits", "8",
         "--methods", "intsgd-random,heuristic-switchml", "--max-steps", "3", "--opt",
         "hidden=(16,)", "--timeout", "60", "--no-progress", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert (data["config"]["bits"], data["config"]["lane_bits"]) == (8, 8)
    for name, m in data["methods"].items():
        assert m["wraps"] == 0, (name, m["wraps"])
        assert m["max_abs_sum"] <= 127, (name, m["max_abs_sum"])
        assert m["clip_fraction"] is not None
        # The bytes are 8-bit lanes' packets (16 + 64 bytes for k = 64: 10 bits per coordinate
        # and round, padding aside); int32 lanes' are 34 per round.
        assert m["bits_per_coord"] < 12 * m["rounds_per_step"], (name, m["bits_per_coord"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_in_8_bit_lanes_counts_the_real_bytes():
    proc = subprocess.run(
        [sys.executable, "-m", "switchagg.workers.cli", "--log-level", "WARNING", "bench", "--workers", "2",
         "--numel", "2500", "--k", "64", "--slots", "32", "--burst", "8", "--repeats", "1",
         "--warmup", "1", "--timeout", "60", "--lane-bits", "8", "--skip-gloo", "--skip-zmq",
         "--json"], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert figures["lane_bits"] == 8 and figures["message_bytes"] == 8 * packet_bytes(64, 8)
    chunks = -(-2500 // 64)
    assert figures["bytes_sent_per_allreduce"] >= chunks * packet_bytes(64, 8)
    assert 0 < figures["goodput"] <= 64 / (16 + 64)  # payload / (header + payload)
