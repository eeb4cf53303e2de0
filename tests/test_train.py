"""The per-worker training loop over in-process workers: records, summaries, reproducibility, report."""

from __future__ import annotations

import json
import os

import pytest

import torch.distributed as dist

from switchagg.collectives import LocalGroup
from switchagg.ddp import hook_for
from switchagg.workers import report
from switchagg.workers.tasks import make_task
from switchagg.workers.train import TrainConfig, train


def _run(method: str, *, seed: int = 0, steps: int = 6, world_size: int = 2, task: str = "digits",
         epochs: int = 1, **task_options):
    """Real DDP on threads: each thread's model in a process-wide group of one rank (DDP's own
    bookkeeping), its hook reducing over the in-process group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    records: list[list[dict]] = [[] for _ in range(world_size)]

    def worker(collective):
        t = make_task(task, **task_options)
        state, _ = hook_for(method, collective=collective, seed=seed)
        return train(t, state, rank=collective.rank, world_size=world_size,
                     config=TrainConfig(max_steps=steps, seed=seed, epochs=epochs),
                     sink=records[collective.rank].append)

    return LocalGroup(world_size).run(worker, timeout=60), records


def test_train_records_and_summary():
    summaries, records = _run("intsgd-random")
    steps = [r for r in records[0] if r["kind"] == "step"]
    evals = [r for r in records[0] if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(6))
    assert {"loss", "lr", "t_compute", "t_quantize", "t_communicate", "t_decode", "max_abs_sum",
            "bytes_sent", "bytes_sent_cum", "rounds"} <= set(steps[0])
    assert len(evals) == 1 and "accuracy" in evals[0]
    assert not [r for r in records[1] if r["kind"] == "eval"]       # rank 0 alone evaluates
    s0, s1 = summaries
    assert s0["steps"] == 6 and s0["evaluation"] and not s1["evaluation"]
    assert s0["params_digest"] == s1["params_digest"]                # replicas stay equal
    assert s0["bytes_sent"] == steps[-1]["bytes_sent_cum"] > 0


def test_same_seed_same_numbers_other_seed_differs():
    a, ra = _run("intsgd-random", seed=3)
    b, rb = _run("intsgd-random", seed=3)
    c, _ = _run("intsgd-random", seed=4)
    losses = lambda recs: [r["loss"] for r in recs[0] if r["kind"] == "step"]  # noqa: E731
    assert losses(ra) == losses(rb)
    assert a[0]["params_digest"] == b[0]["params_digest"] != c[0]["params_digest"]
    assert a[0]["evaluation"] == b[0]["evaluation"]


def test_logreg_through_a_method_converges():
    summaries, records = _run("intsgd-random", steps=40, epochs=40, task="logreg")
    evals = [r for r in records[0] if r["kind"] == "eval"]
    assert evals and evals[-1]["suboptimality"] < 0.05 and "dist2" in evals[-1]


def test_merge_table_results_and_plots(tmp_path):
    by_method, rec = {}, {}
    for name in ("sgd", "heuristic-switchml"):
        summaries, records = _run(name, steps=4)
        by_method[name] = report.merge_ranks(summaries, "accuracy")
        rec[name] = records[0]
    m = by_method["heuristic-switchml"]
    assert m["rounds_per_step"] == 2.0 and m["bytes_sent"] == 2 * m["bytes_sent_per_worker"]
    assert m["replicas_agree"] and m["final_accuracy"] is not None and m["max_abs_sum"] > 0
    assert by_method["sgd"]["max_abs_sum"] == 0
    table = report.format_table(by_method, "accuracy")
    assert "heuristic-switchml" in table and "max|sum|" in table
    path = tmp_path / "results.json"
    report.write_results(str(path), {"task": "digits"}, by_method)
    data = json.loads(path.read_text())
    for key in ("final_loss", "final_accuracy", "steps", "wall_s", "bytes_sent", "packets",
                "rounds_per_step", "max_abs_sum", "bits_needed", "clip_fraction", "wraps"):
        assert key in data["methods"]["sgd"]
    written = report.plot_all(str(tmp_path), rec, "accuracy")
    names = {os.path.basename(p) for p in written}
    assert names == {f.format(metric="accuracy") for f in report.PLOT_FILES}
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_intsgd_steady_state_range_excludes_the_heuristic_first_step():
    summaries, _ = _run("intsgd-random", steps=6)
    merged = report.merge_ranks(summaries, "accuracy")
    # Step 0 borrows SwitchML's exponent scaling (near the int32 limit); later steps use alpha_k.
    assert merged["bits_needed"] >= 30
    assert 0 < merged["max_abs_sum_after_first_step"] < merged["max_abs_sum"]
    assert merged["bits_needed_after_first_step"] < 24
    table = report.format_table({"x": merged})
    assert f"{merged['max_abs_sum_after_first_step']}/{merged['max_abs_sum']}" in table
    # One worker's integers too (what a b-bit packet must hold), both ways, in results.json.
    q_later, q_all = merged["max_abs_q_after_first_step"], merged["max_abs_q"]
    assert 0 < q_later < q_all and q_all >= 2 ** 29 and "max|Q_i|" in table
    assert f"{q_later}/{q_all}" in table
    sgd = report.merge_ranks(_run("sgd", steps=2)[0], "accuracy")
    assert sgd["max_abs_q"] == sgd["max_abs_q_after_first_step"] == 0


def test_merge_flags_disagreeing_replicas():
    base = {"rank": 0, "steps": 1, "wall_s": 1.0, "evaluation": {"loss": 1.0}, "bytes_sent": 10,
            "packets": 1, "rounds_per_step": 1, "max_abs_sum": 1, "max_abs_q": 1, "bits_needed": 2,
            "clip_fraction": 0.0, "wraps": 0, "time_per_step": {"compute": 0.1},
            "params_digest": "a"}
    merged = report.merge_ranks([base, {**base, "rank": 1, "params_digest": "b"}], "accuracy")
    assert not merged["replicas_agree"] and merged["final_accuracy"] is None


@pytest.mark.parametrize("task", ["logreg"])
def test_worker_needs_identity_for_torch(task, tmp_path):
    from switchagg.workers.cli import build_parser
    from switchagg.workers.worker import run_methods, _Emitter
    argv = ["worker", "--task", task, "--methods", "sgd", "--world-size", "2"]
    args = build_parser(argv).parse_args(argv)
    args.rank = args.master_addr = args.master_port = None
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        run_methods(args, ["sgd"], _Emitter(False, 0))


def test_device_for_local_rank_gives_each_torchrun_process_its_own_gpu():
    from switchagg.workers.worker import device_for_local_rank

    assert device_for_local_rank("cuda", "3") == "cuda:3"
    assert device_for_local_rank("cuda", None) == "cuda"
    assert device_for_local_rank("cuda:1", "3") == "cuda:1"   # an explicit index wins
    assert device_for_local_rank("cpu", "3") == "cpu"
