"""SwarmSGD's training loop: in-process workers on a real task, its options, and the comparison
against synchronous SGD and IntSGD on the default digits task (`switchagg compare`)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch.distributed as dist

from tests.conftest import REPO, free_port
from switchagg.workers.swarm_train import SWARM_OPTIONS, SwarmConfig, split_options, train_swarm
from switchagg.workers.tasks import make_task
from switchagg.workers.train import TrainConfig


def _run_in_threads(world, config, swarm, task_options=None):
    port = free_port()
    stores = [dist.TCPStore("127.0.0.1", port, world, is_master=True,
                            timeout=datetime.timedelta(seconds=30), wait_for_workers=False)]
    stores += [dist.TCPStore("127.0.0.1", port, world, is_master=False,
                             timeout=datetime.timedelta(seconds=30)) for _ in range(world - 1)]
    results, errors = [None] * world, []

    def work(rank):
        try:
            task = make_task("digits", **(task_options or {"hidden": (16,)}))
            records = []
            results[rank] = (train_swarm(task, rank=rank, world_size=world, config=config,
                                         swarm=swarm, store=stores[rank], job="t", timeout=30,
                                         sink=records.append), records)
        except Exception as exc:  # reported below, with the rank
            errors.append((rank, exc))
    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("blocking", [False, True])
def test_train_swarm_averages_and_gathers_the_final_models(blocking):
    swarm = SwarmConfig(local_steps=2, blocking=blocking, exchange_timeout=10.0)
    results = _run_in_threads(3, TrainConfig(epochs=2, seed=1), swarm)
    summaries = [s for s, _ in results]
    head = summaries[0]
    assert all(s["decentralized"] and s["steps"] == summaries[0]["steps"] > 0 for s in summaries)
    assert head["evaluation"]["accuracy"] > 0.5
    assert sorted(e["rank"] for e in head["node_evaluations"]) == [0, 1, 2]
    assert head["worst_node"]["accuracy"] <= head["evaluation"]["accuracy"] + 0.05
    assert head["missing_ranks"] == [] and head["model_spread"] >= 0
    for s in summaries:
        sw = s["swarm"]
        assert sw["interactions"] >= 1 and sw["errors"] == sw["malformed"] == sw["timeouts"] == 0
        assert s["interactions"] == sw["interactions"] + sw["served"]
        assert s["bytes_sent"] == sw["bytes_sent"] > 0 and 0 <= s["sync_fraction"] < 1
        assert s["examples_seen"] == s["steps"] * 32
    # each interaction is one average on each side of it
    assert sum(s["swarm"]["interactions"] for s in summaries) == sum(s["swarm"]["served"] for s in summaries)
    steps = [r for r in results[0][1] if r["kind"] == "step"]
    assert len(steps) == head["steps"] and steps[-1]["bytes_sent_cum"] > 0
    evals = [r for r in results[0][1] if r["kind"] == "eval"]
    assert [e["model"] for e in evals] == ["local", "average"]
    # what the comparison makes of them
    from switchagg.workers.report import format_table, merge_ranks
    entry = merge_ranks(summaries, "accuracy")
    assert entry["replicas_agree"] is None and entry["final_accuracy"] == head["evaluation"]["accuracy"]
    assert entry["bytes_sent"] == sum(s["bytes_sent"] for s in summaries)
    assert entry["sync_fraction"] == pytest.approx(np.mean([s["sync_fraction"] for s in summaries]))
    d = entry["decentralized"]
    assert d["interactions_per_node"] == pytest.approx(np.mean([s["interactions"] for s in summaries]))
    assert d["data_passes"] == pytest.approx(sum(s["examples_seen"] for s in summaries)
                                             / sum(s["shard_size"] for s in summaries))
    table = format_table({"swarmsgd": entry})
    assert "sync %" in table and "swarmsgd: accuracy of the average model" in table


def test_options_are_split_from_the_task_and_validated():
    task, swarm = split_options({"hidden": (8,), "local_steps": 4, "quant": "none"})
    assert task == {"hidden": (8,)} and swarm == {"local_steps": 4, "quant": "none"}
    assert set(SWARM_OPTIONS) >= {"local_steps", "quant", "quant_bits", "graph", "degree"}
    assert SwarmConfig.from_options(swarm).local_steps == 4
    for bad, name in (({"local_steps": 0}, "local_steps"), ({"quant": "qsgd"}, "quant"),
                      ({"quant_bits": 5}, "quant_bits"), ({"nope": 1}, "nope")):
        with pytest.raises(ValueError, match=name):
            SwarmConfig.from_options(bad)


def _compare(*argv, timeout=400):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "switchagg.workers.cli", "compare", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_swarmsgd_is_within_one_point_of_sgd_on_the_default_task(tmp_path):
    # The acceptance run: default task and epochs, 4 workers, in one table with sgd
    # (intsgd-random beside them is the same table; tests/test_compare.py runs it).
    proc = _compare("--workers", "4", "--methods", "sgd,swarmsgd", "--no-progress",
                    "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("method"))
    assert "compute  sync %" in header   # the sync fraction beside compute time
    for name in ("sgd", "swarmsgd"):
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name
    assert "swarmsgd: accuracy of the average model" in proc.stdout
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    sgd, swarm = methods["sgd"], methods["swarmsgd"]
    # The claim is about what the method reaches, and one non-blocking run's accuracy depends on
    # how its interactions happened to be scheduled: on the 450 test digits it was 95.56% (1.1
    # points under SGD's 96.67%) in 3 of 20 runs of this file and 95.78% to 96.89% otherwise.
    # A second run halves the variance of the estimate; SGD's run is deterministic.
    again = _compare("--workers", "4", "--methods", "swarmsgd", "--no-progress",
                     "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "again" / "results.json").read_text())["methods"]["swarmsgd"]
    reached = (swarm["final_accuracy"] + second["final_accuracy"]) / 2
    assert reached >= sgd["final_accuracy"] - 0.01, (swarm["final_accuracy"],
                                                     second["final_accuracy"],
                                                     sgd["final_accuracy"])
    assert swarm["steps"] == sgd["steps"]                          # same epochs, same steps
    assert abs(swarm["decentralized"]["data_passes"] - 20) < 1.1  # 20 epochs = 20 passes (floor)
    assert swarm["bytes_sent_per_worker"] < 0.6 * sgd["bytes_sent_per_worker"]
    assert swarm["replicas_agree"] is None and sgd["replicas_agree"] is True
    d = swarm["decentralized"]
    assert d["dead_peers"] == [] and d["errors"] == 0 and d["interactions_per_node"] >= 10
    assert 0 < swarm["sync_fraction"] < 1 and 0 < sgd["sync_fraction"] < 1
    assert np.isfinite(d["model_spread"])


def test_the_rendezvous_wait_returns_when_the_keys_are_set_or_names_the_missing_at_its_deadline():
    import time
    from switchagg.workers.swarm_train import _wait_keys
    store = dist.HashStore()
    setter = threading.Timer(0.1, lambda: (store.set("a", b"1"), store.set("b", b"1")))
    setter.start()
    try:
        assert _wait_keys(store, ["a", "b"], time.monotonic() + 30) == []
    finally:
        setter.cancel()
    t0 = time.monotonic()
    assert _wait_keys(store, ["a", "c", "d"], t0 + 0.2) == ["c", "d"]
    assert time.monotonic() - t0 < 10
    # a deadline passed, or a fraction of a millisecond away (the store reads 0 as no timeout)
    assert _wait_keys(store, ["c"], time.monotonic() - 1) == ["c"]
    assert _wait_keys(store, ["c"], time.monotonic() + 1e-5) == ["c"]


def test_local_host_keeps_loopback_on_loopback():
    from switchagg.workers.swarm_train import local_host
    assert local_host("127.0.0.1") == "127.0.0.1"
    assert local_host("localhost") == "127.0.0.1"
    assert local_host("no-such-host.invalid") == "127.0.0.1"


def test_compare_rejects_a_bad_swarm_option_before_starting_workers():
    proc = _compare("--methods", "swarmsgd", "--opt", "quant=qsgd", timeout=60)
    assert proc.returncode == 2 and "quant" in proc.stderr and "lattice" in proc.stderr


def test_gathering_leaves_out_a_final_model_of_the_wrong_size_or_with_nan():
    """Rank 0 reads every final model from the store (a peer's bytes): one of the wrong size and
    one with a NaN are left out of the average with a warning, not a crash or a NaN average."""
    from switchagg.workers.swarm_train import _FlatModel, _gather_and_evaluate
    task = make_task("digits", hidden=(8,))
    model = task.build_model()
    flat = _FlatModel([p for p in model.parameters() if p.requires_grad])
    good = flat.read().astype(np.float32)
    nan = good.copy()
    nan[0] = np.nan
    store = dist.HashStore()
    for rank, vec in enumerate([good, good + 1, good[:-1], nan]):
        store.set(f"j/model/{rank}", vec.tobytes())
    import time
    out = _gather_and_evaluate(task, model, flat, store, "j", 4, time.monotonic() + 10)
    assert out["missing_ranks"] == [2, 3]
    assert [e["rank"] for e in out["node_evaluations"]] == [0, 1]
    np.testing.assert_allclose(flat.read(), good + 0.5, atol=1e-5)   # the average of 0 and 1
