"""`switchagg reproduce` on a test-only configuration: the runs go through compare's machinery and
the report (Markdown, JSON, PNGs) lists every claim with a verdict."""

from __future__ import annotations

import json
import os

import pytest

from switchagg.workers import reproduce
from switchagg.workers.reproduce import RUNS, Run, plan

pytestmark = pytest.mark.slow

#: The a5a LIBSVM file (not part of the repository); the a5a parts skip without it.
A5A = os.environ.get("SWITCHAGG_A5A", "/work/shared/data/a5a")


def test_plan_skips_the_a5a_runs_without_the_file_and_says_so():
    runs, notes = plan(quick=True, a5a=None)
    assert runs and not any(r.needs_a5a for r, _ in runs)
    assert any("a5a" in n and "--a5a" in n for n in notes)
    full, _ = plan(quick=False, a5a="/some/a5a")
    assert {r.name for r, _ in full} == {r.name for r in RUNS}
    assert len(full) > len(runs) and {s for _, s in full} == {0, 1, 2}
    assert {r.workers for r in RUNS} >= {4, 16}
    some, notes = plan(quick=False, a5a=None, only=["digits-4"], seeds=[5])
    assert [(r.name, s) for r, s in some] == [("digits-4", 5)]
    assert any("not selected" in n for n in notes)
    with pytest.raises(ValueError, match="digits-4"):
        plan(quick=True, a5a=None, only=["nope"])


@pytest.mark.timeout(420)
def test_reproduce_writes_its_report(tmp_path):
    tiny = [(Run("digits-4", "digits", 2, ("sgd", "intsgd-random", "heuristic-switchml"), epochs=1,
                 quick_epochs=1, opts=("hidden=(16,)",), seeds=(0,)), 0)]
    notes = ["fmnist-fc-4: skipped in this test"]
    if os.path.exists(A5A):
        tiny.append((Run("logreg-a5a-4", "logreg", 2, ("sgd", "intsgd-random", "intdiana"),
                         epochs=40, quick_epochs=40, eval_every=20, needs_a5a=True), 0))
    lines = []
    content = reproduce.run_all(str(tmp_path), quick=True, a5a=A5A, runs=tiny, notes=notes,
                                timeout=60, progress=lines.append)
    assert lines[0].startswith("switchagg reproduce:") and "expected about" in lines[0]
    assert any(line.startswith("[1/") and "done" in line for line in lines)
    report = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "claims.json").read_text())
    assert data == json.loads(json.dumps(content, default=str).replace("NaN", "null")) or data
    by_id = {c["id"]: c for c in data["claims"]}
    assert {"intsgd-accuracy", "heuristic-extra-round", "intdiana-bounded", "int8-16-workers",
            "int8-bytes", "isgq-compression", "swarmsgd-sync"} <= set(by_id)
    for c in data["claims"]:
        assert c["id"] and c["verdict"] and c["measured"], c
        assert f"**{c['verdict']}**" in report
    assert by_id["heuristic-extra-round"]["verdict"] == "holds"
    assert "2.0 vs 1.0 rounds per step from step 1" in by_id["heuristic-extra-round"]["measured"]
    assert by_id["int8-16-workers"]["verdict"] == "not run"
    assert by_id["int8-bytes"]["verdict"] == "not measurable"
    assert by_id["intsgd-accuracy"]["verdict"] in ("holds", "does not hold")
    assert "fmnist-fc-4: skipped" in report
    assert (tmp_path / "runs" / "digits-4-seed0" / "results.json").exists()
    if os.path.exists(A5A):
        assert by_id["intdiana-bounded"]["verdict"] in ("holds", "does not hold")
        assert "IntDIANA" in by_id["intdiana-bounded"]["measured"]
        assert (tmp_path / "int_ranges_logreg-a5a-4.png").stat().st_size > 1000
