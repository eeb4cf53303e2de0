"""switchagg.ddp: DDP training with the switch hooks against plain DDP, over gloo and a real switch.

Ranks are `tests/ddp_worker.py` processes (torch.distributed gloo, free loopback ports) talking to
a real `python -m switch_emulator`. One launch of 2 ranks trains every variant in turn (torch's
import dominates a launch, so they share it); a second launch uses 3 ranks.

Tolerance (the worker's loss is quadratic, so the averaged gradient is G(x) = H x - b with H
positive semi-definite, and eta * lambda_max(H) < 1 for its data and eta = 0.05). Let e_k be the
decoded average's error at step k. The hook's and plain DDP's parameters then differ by
delta_{k+1} = (I - eta H) delta_k - eta e_k, and ||I - eta H|| <= 1, so:
- randomized rounding: e_k has mean zero given the past, and each worker's Int(t) - t has variance
  frac(t)(1 - frac(t)) <= 1/4 per coordinate, so E||e_k||^2 <= d / (4 n alpha_k^2) and
  E||delta_N||^2 <= eta^2 sum_k d / (4 n alpha_k^2) =: B. ||delta_N||^2 is a sum of about d N
  independent terms (d = 207), so it lies far below 4 B; the streams are seeded, so the test is
  deterministic. (Per-parameter alpha: d / alpha^2 becomes sum_l d_l / alpha_l^2.)
- deterministic rounding: |Int(t) - t| <= 1/2 per worker, so ||e_k|| <= sqrt(d) / (2 alpha_k) and
  ||delta_N|| <= eta sum_k sqrt(d) / (2 alpha_k): a hard bound.
- SwitchML (and IntSGD's step 0): chunk c is scaled by f_c = M / (n 2^e_c) with 2^e_c <= 2 max|g|,
  so |e| <= 1 / (2 f_c) <= n max|g| / M per coordinate, M = 2^31 - 1: ||delta_N|| <= eta
  sum_k sqrt(d) n max|g_k| / M.
Each bound gets 1e-5 of slack for float32 arithmetic (gloo's fp32 sums vs decoding in float64).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import signal
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist

from conftest import PYTHON, REPO, free_port
from switchagg import SwitchTimeout
from switchagg.client import ClientConfig, SwitchClient
from switchagg.codecs import Bucket
from switchagg.collectives import LocalGroup, SwitchCollective
from switchagg.ddp import IntSGDState, intsgd_hook, noop_hook
from switchagg.methods import make_codec

pytestmark = pytest.mark.slow
WORKER = os.path.join(REPO, "tests", "ddp_worker.py")
EXAMPLE = os.path.join(REPO, "workers", "examples", "ddp_hook.py")
LR, STEPS, D = 0.05, 8, 207
#: The numpy kernels need no JIT compilation (numba's takes ~20 s per process on a busy host) and
#: give the same integers as every other backend.
ENV = {"SWITCHAGG_CPU_KERNELS": "numpy", "OMP_NUM_THREADS": "1"}
#: Every method through `hook_for`, recorded bucket by bucket for the cross-driver replay.
CODEC_RUNS = ["sgd", "intsgd-random", "intsgd-determ", "intsgd-block", "intdiana",
              "heuristic-switchml", "heuristic-global"]
ALL_RUNS = "local,ref,noop,random,determ,determ2,block,switchml," + ",".join(
    f"m:{name}" for name in CODEC_RUNS)


def start_switch(spawn) -> str:
    """A switch that waits 20 s before declaring a silent rank dead: on a busy 2-core host a
    rank's engine thread can starve for the default 3 s while the other ranks import torch."""
    address = f"tcp://127.0.0.1:{free_port()}"
    spawn([PYTHON, "-m", "switch_emulator", "--bind", address, "--log-level", "WARNING",
           "--liveness-timeout", "20"])
    return address


def launch(spawn, tmp_path, world: int, runs: str, address: str | None = None,
           env: dict | None = None, steps: int = STEPS) -> list[dict]:
    """Run the worker on `world` ranks (against a new switch unless `address`); returns each
    rank's results."""
    address = address or start_switch(spawn)
    port = free_port()
    procs = [spawn([PYTHON, WORKER, address, str(tmp_path), runs, str(steps)],
                   env={**ENV, **(env or {}), "RANK": str(r), "WORLD_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outputs = [p.communicate(timeout=150) for p in procs]
    for r, (out, err) in enumerate(outputs):  # every rank's story: the first failure may be any
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines and json.loads(lines[-1])["ok"], "\n".join(
            f"rank {i}: {o[-1500:]} {e[-2500:]}" for i, (o, e) in enumerate(outputs))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every variant trained on 2 ranks (one launch shared by the tests below)."""
    children: list[subprocess.Popen] = []

    def spawn(argv, **kwargs):  # conftest's `spawn`, at module scope
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update(kwargs.pop("env", {}))
        children.append(subprocess.Popen(argv, env=env, start_new_session=True, **kwargs))
        return children[-1]

    tmp = tmp_path_factory.mktemp("ddp2")
    try:
        yield launch(spawn, tmp, 2, ALL_RUNS), tmp
    finally:
        for proc in children:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def flat(params) -> torch.Tensor:
    return torch.cat([p.reshape(-1).double() for p in params])


def sq_dist(a, b) -> float:
    return float((flat(a) - flat(b)).pow(2).sum())


def heuristic_bound(gmax: list[float], n: int) -> float:
    """Hard bound on ||delta|| from SwitchML-scaled steps (see the module docstring)."""
    return LR * sum(math.sqrt(D) * n * g / (2 ** 31 - 1) for g in gmax)


def random_bound(alphas, n: int, sizes=(D,)) -> float:
    """B = eta^2 sum_k sum_l d_l / (4 n alpha_{k,l}^2) over the alpha steps."""
    return LR ** 2 * sum(sum(d / (4 * n * a * a) for d, a in zip(sizes, step))
                         for step in alphas if step is not None)


@pytest.mark.timeout(200)
def test_intsgd_random_matches_plain_ddp_within_rounding_variance(two_ranks):
    results, _ = two_ranks
    for rank in results:
        run, ref = rank["random"], rank["ref"]
        assert run["alpha"][0] is None and all(a is not None for a in run["alpha"][1:])
        bound = 4 * random_bound(run["alpha"], 2) + (heuristic_bound(run["gmax"][:1], 2)
                                                    + 1e-5) ** 2
        dist2 = sq_dist(run["params"], ref["params"])
        assert 0 < dist2 <= bound, (dist2, bound)
    # The hook averages: ranks with different data end with the same parameters.
    assert sq_dist(results[0]["random"]["params"], results[1]["random"]["params"]) == 0


@pytest.mark.timeout(200)
def test_intsgd_deterministic_within_hard_bound_and_reproducible(two_ranks):
    results, _ = two_ranks
    for rank in results:
        run = rank["determ"]
        bound = LR * sum(math.sqrt(D) / (2 * a[0]) for a in run["alpha"][1:])
        bound += heuristic_bound(run["gmax"][:1], 2) + 1e-5
        assert math.sqrt(sq_dist(run["params"], rank["ref"]["params"])) <= bound
        # A fresh state and job gives the very same bits, and so does the other rank.
        assert all(torch.equal(a, b) for a, b in zip(run["params"], rank["determ2"]["params"]))
        assert all(torch.equal(a, b) for a, b in zip(run["params"],
                                                      results[0]["determ"]["params"]))
        assert run["alpha"] == results[0]["determ"]["alpha"]  # alpha bit-identical across ranks


@pytest.mark.timeout(200)
def test_intsgd_block_matches_plain_ddp_with_one_alpha_per_parameter(two_ranks):
    results, _ = two_ranks
    sizes = [p.numel() for p in results[0]["ref"]["params"]]
    for rank in results:
        run = rank["block"]
        assert all(len(a) == len(sizes) for a in run["alpha"][1:])
        assert len(set(run["alpha"][-1])) > 1  # the parameters did get different scales
        bound = 4 * random_bound(run["alpha"], 2, sizes) + (heuristic_bound(run["gmax"][:1], 2)
                                                           + 1e-5) ** 2
        assert 0 < sq_dist(run["params"], rank["ref"]["params"]) <= bound
    assert results[0]["block"]["alpha"] == results[1]["block"]["alpha"]


@pytest.mark.timeout(200)
def test_switchml_hook_is_near_lossless_at_32_bits(two_ranks):
    results, _ = two_ranks
    for rank in results:
        run = rank["switchml"]
        bound = heuristic_bound(run["gmax"], 2) + 1e-5
        assert math.sqrt(sq_dist(run["params"], rank["ref"]["params"])) <= bound
        assert all(a is None for a in run["alpha"])


@pytest.mark.timeout(200)
def test_hooks_follow_the_bucket_rebuild(two_ranks):
    results, _ = two_ranks
    buckets = results[0]["random"]["buckets"]
    first = [numel for it, _, numel in buckets if it == 0]
    later = [numel for it, _, numel in buckets if it == STEPS - 1]
    assert first == [D]                     # iteration 0: one bucket of everything
    assert sorted(later) == [18, 39, 150]   # then rebuilt: one per head, in gradient-ready order
    assert buckets == results[1]["random"]["buckets"]  # the same order on every rank


@pytest.mark.timeout(200)
def test_noop_hook_leaves_local_gradients(two_ranks):
    results, _ = two_ranks
    for rank in results:
        assert all(torch.equal(a, b) for a, b in zip(rank["noop"]["params"],
                                                      rank["local"]["params"]))
    assert sq_dist(results[0]["noop"]["params"], results[1]["noop"]["params"]) > 0


@pytest.mark.timeout(200)
def test_state_pickles_into_a_checkpoint_without_its_client(two_ranks):
    results, tmp = two_ranks
    with open(tmp / "state0.pkl", "rb") as f:
        state = pickle.load(f)
    assert isinstance(state, IntSGDState)
    assert state._client is None and state.error is None
    assert state.iteration == STEPS and state.rounding == "deterministic" and state.seed == 7
    assert state.address.startswith("tcp://127.0.0.1:") and state.job == "determ"
    # The scaler came back: the next step's alpha is the one the live state would have used.
    assert state._scaler.alpha(LR).tolist() == results[0]["determ"]["next_alpha"]
    with open(tmp / "state1.pkl", "rb") as f:
        assert pickle.load(f)._scaler.alpha(LR).tolist() == results[1]["determ"]["next_alpha"]
    assert pickle.loads(pickle.dumps(state))._scaler.r.tolist() == state._scaler.r.tolist()


@pytest.mark.timeout(200)
def test_same_job_name_twice_in_a_row_even_if_the_first_run_never_closed(spawn, tmp_path):
    # The switch waits 20 s before declaring a silent rank dead: the second run, started as
    # soon as the first one's processes ended, can join only if the first job already ended.
    address = start_switch(spawn)
    first = launch(spawn, tmp_path, 2, "random", address, {"DDP_WORKER_LEAVE_OPEN": "1"}, 2)
    second = launch(spawn, tmp_path, 2, "random", address, steps=2)
    for a, b in zip(first, second):  # the same seeds, data and job name: the same training
        assert all(torch.equal(p, q) for p, q in zip(a["random"]["params"], b["random"]["params"]))


def test_three_ranks_stay_bit_identical_and_close_to_plain_ddp(spawn, tmp_path):
    results = launch(spawn, tmp_path, 3, "ref,determ")
    for rank in results:
        assert all(torch.equal(a, b) for a, b in zip(rank["determ"]["params"],
                                                      results[0]["determ"]["params"]))
        run = rank["determ"]
        bound = LR * sum(math.sqrt(D) / (2 * a[0]) for a in run["alpha"][1:])
        bound += heuristic_bound(run["gmax"][:1], 3) + 1e-5
        assert math.sqrt(sq_dist(run["params"], rank["ref"]["params"])) <= bound


# ---- in this process: one rank, failures before anything is sent ----------------------------

@pytest.fixture
def one_rank_ddp(monkeypatch):
    """A one-rank gloo group and a DDP model; numpy kernels (no JIT in this process)."""
    kernels = importlib.import_module("switchagg.kernels")
    monkeypatch.setattr(kernels, "_cpu_backend",
                        importlib.import_module("switchagg.kernels._numpy"))
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    finally:
        dist.destroy_process_group()


def _free_closed_port() -> str:
    """An address nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(30)
def test_unreachable_switch_fails_the_future_with_a_timeout_naming_it(one_rank_ddp):
    address = _free_closed_port()
    state = IntSGDState(address, timeout=1.0)
    one_rank_ddp.register_comm_hook(state, intsgd_hook)
    with pytest.raises(RuntimeError, match=rf"SwitchTimeout.*{address}"):
        one_rank_ddp(torch.ones(3, 4)).sum().backward()
    assert isinstance(state.error, SwitchTimeout) and address in str(state.error)


@pytest.mark.timeout(30)
def test_non_finite_gradient_raises_before_sending(one_rank_ddp):
    state = IntSGDState(_free_closed_port(), timeout=1.0)
    one_rank_ddp.register_comm_hook(state, intsgd_hook)
    with pytest.raises(Exception, match=r"2 NaN and 0 Inf.*nothing was sent") as info:
        one_rank_ddp(torch.tensor([[float("nan"), 0, 0, 0]])).sum().backward()
    assert "NonFiniteGradient" in type(info.value).__name__ + str(info.value)
    assert state._client is None  # it never tried to reach the (absent) switch


@pytest.mark.timeout(30)
def test_noop_hook_returns_the_bucket_untouched(one_rank_ddp):
    one_rank_ddp.register_comm_hook(None, noop_hook)
    one_rank_ddp(torch.ones(3, 4)).sum().backward()
    assert torch.equal(one_rank_ddp.module.bias.grad, torch.full((2,), 3.0))


@pytest.mark.parametrize("kwargs, name", [
    (dict(), "address"),
    (dict(address="tcp://127.0.0.1:1", client=object()), "address"),
    (dict(address="localhost:5555"), "address"),
    (dict(address="tcp://127.0.0.1:1", rounding="up"), "rounding"),
    (dict(address="tcp://127.0.0.1:1", world_size=16, bits=4), "bits"),
    (dict(address="tcp://127.0.0.1:1", world_size=0), "world_size"),
    (dict(address="tcp://127.0.0.1:1", lr=0.0), "lr"),
    (dict(address="tcp://127.0.0.1:1", beta=1.0), "beta"),
    (dict(address="tcp://127.0.0.1:1", seed=-1), "seed"),
    (dict(address="tcp://127.0.0.1:1", timeout=0), "timeout"),
])
def test_state_rejects_bad_values_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        IntSGDState(**kwargs)


@pytest.mark.timeout(120)
def test_example_runs_under_torchrun_against_a_local_switch(spawn, tmp_path):
    address = start_switch(spawn)
    torchrun = os.path.join(os.path.dirname(PYTHON), "torchrun")
    proc = spawn([torchrun, "--standalone", "--nproc-per-node", "2", EXAMPLE, "--switch", address,
                  "--steps", "6"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True, cwd=tmp_path)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 0, out[-4000:]
    assert "step 5" in out and "ranks agree" in out


def _replay(records: list[list[dict]], name: str, member) -> list[list[torch.Tensor]]:
    """Each rank's recorded DDP buckets through the same codec, on `member(rank)`'s collective."""
    world = len(records)

    def rank_body(collective) -> list[torch.Tensor]:
        codec = make_codec(name, world_size=world, rank=collective.rank, seed=7, k=8)
        mine = sorted(records[collective.rank], key=lambda r: (r["iteration"], r["position"]))
        outs = []
        for it in sorted({r["iteration"] for r in mine}):
            codec.begin(it, LR)
            offset = 0
            for r in (r for r in mine if r["iteration"] == it):
                bucket = Bucket.of_sizes(r["sizes"], index=r["position"], offset=offset,
                                         keys=r["keys"])
                out = torch.empty_like(r["input"])
                payload, result = collective.launch(codec.encode(r["input"], bucket))
                codec.decode(result.result(timeout=30), payload.ctx, out)
                outs.append(out)
                offset += bucket.numel
            codec.end()
        return outs

    return member(rank_body)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", CODEC_RUNS)
def test_every_method_is_bit_identical_through_ddp_the_switch_and_in_process(two_ranks, spawn,
                                                                            name):
    """One codec, three drivers: DDP's hook (over the switch, or gloo for sgd), the in-process
    group, and in-process threads each with its own client of a real switch."""
    results, _ = two_ranks
    records = [r[f"m:{name}"]["buckets"] for r in results]
    assert len({r["iteration"] for r in records[0]}) == STEPS
    assert max(r["position"] for r in records[0]) >= 1        # DDP rebuilt into several buckets
    ddp_out = [[r["output"] for r in sorted(rec, key=lambda r: (r["iteration"], r["position"]))]
               for rec in records]
    local = _replay(records, name, lambda body: LocalGroup(2, k=8, slots=16).run(body))
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(ddp_out[rank], local[rank])), rank
    if make_codec(name, world_size=2, rank=0).runs_on_switch():
        address = start_switch(spawn)
        config = ClientConfig(k=8, slots=16, burst=8, join_timeout=20, op_timeout=20)

        def over_switch(body):
            def with_client(local_member):
                with SwitchClient(address, f"replay-{name}", 2, rank=local_member.rank,
                                  config=config) as client:
                    return body(SwitchCollective(client))
            return LocalGroup(2).run(with_client, timeout=60)

        switched = _replay(records, name, over_switch)
        for rank in range(2):
            assert all(torch.equal(a, b) for a, b in zip(ddp_out[rank], switched[rank])), rank
