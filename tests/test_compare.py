"""`switchagg compare` end to end on a tiny configuration: switch + 2 worker processes, 3 methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _compare(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "switchagg.workers.cli", "compare", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


@pytest.mark.timeout(300)
def test_compare_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = _compare("--workers", "2", "--methods", "sgd,intsgd-random,heuristic-switchml",
                    "--max-steps", "3", "--opt", "hidden=(16,)", "--timeout", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "intsgd-random" in proc.stdout and "max|sum|" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["workers"] == 2 and data["config"]["task"] == "digits"
    assert list(data["methods"]) == ["sgd", "intsgd-random", "heuristic-switchml"]
    for name, m in data["methods"].items():
        for key in ("final_loss", "final_accuracy", "steps", "wall_s", "bytes_sent", "packets",
                    "rounds_per_step", "max_abs_sum", "bits_needed", "clip_fraction", "wraps"):
            assert key in m, (name, key)
        assert m["steps"] == 3 and m["replicas_agree"] and 0 <= m["final_accuracy"] <= 1
    # integer methods went through the switch (packets), sgd through gloo (no packets)
    assert data["methods"]["intsgd-random"]["packets"] > 0 and data["methods"]["sgd"]["packets"] == 0
    assert data["methods"]["heuristic-switchml"]["rounds_per_step"] == 2
    for rank in (0, 1):
        lines = (out / "metrics" / f"intsgd-random.rank{rank}.jsonl").read_text().splitlines()
        assert sum(json.loads(x)["kind"] == "step" for x in lines) == 3
    for png in ("loss_vs_step.png", "loss_vs_bytes.png", "accuracy_vs_step.png",
                "accuracy_vs_bytes.png", "int_magnitude_vs_step.png"):
        assert (out / png).stat().st_size > 1000
    assert data["provenance"]["switchagg"] and data["provenance"]["command"]
    assert "units:" in (out / "table.txt").read_text()

    # `switchagg report` on the per-rank files alone gives the same merged results.
    compare_json = data
    (out / "results.json").unlink()
    (out / "loss_vs_step.png").unlink()
    env = dict(os.environ, PYTHONPATH=REPO)
    report = subprocess.run([sys.executable, "-m", "switchagg.workers.cli", "report", str(out)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "intsgd-random: 2 ranks, 3 steps" in report.stderr and "max|sum|" in report.stdout
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["methods"]) == list(compare_json["methods"])
    for name, m in merged["methods"].items():
        ours = compare_json["methods"][name]
        for key in ("final_loss", "steps", "bytes_sent", "packets", "max_abs_sum", "replicas_agree"):
            assert m[key] == ours[key], (name, key)
    assert merged["config"]["task"] == "digits" and merged["config"]["workers"] == 2
    assert merged["provenance"]["run"]["torch"] and merged["provenance"]["report"]["command"]
    assert (out / "loss_vs_step.png").stat().st_size > 1000


def test_report_rejects_a_folder_without_summaries(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "switchagg.workers.cli", "report", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no summaries" in proc.stderr


@pytest.mark.timeout(120)
def test_compare_worker_failure_names_rank_and_exits(tmp_path):
    # Options are valid (checked before start); rank 1 fails in its data, after the start.
    proc = _compare("--workers", "2", "--methods", "intsgd-random", "--max-steps", "2",
                    "--task", "tests.failing_task:broken", "--timeout", "30",
                    "--out", str(tmp_path / "bad"), timeout=100)
    assert proc.returncode == 1
    assert "worker rank 1" in proc.stderr and "unreadable" in proc.stderr


def test_compare_rejects_unknown_method():
    proc = _compare("--methods", "sgd,nope", timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr and "intsgd-random" in proc.stderr
