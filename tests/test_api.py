"""`switchagg.workers.api.compare` on a user's own model and data (the example's 1-D CNN), and the task
factories behind `--task module:function`."""

from __future__ import annotations

import json

import pytest

from switchagg.workers.api import compare
from switchagg.workers.examples.own_model import make_data, make_model
from switchagg.workers.tasks import make_task
from switchagg.workers.tasks.custom import callable_name
from switchagg.workers.validate import UsageError


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_own_model_returns_results_json(tmp_path):
    results = compare(make_model, make_data, methods=["sgd", "intsgd-random"], workers=2,
                      max_steps=3, batch_size=16, lr=0.2, timeout=60, out=str(tmp_path))
    assert list(results["methods"]) == ["sgd", "intsgd-random"]
    assert results["config"]["task"] == "custom"
    assert results["config"]["options"]["model"] == "switchagg.workers.examples.own_model:make_model"
    for m in results["methods"].values():
        assert m["steps"] == 3 and m["replicas_agree"] and 0 <= m["final_accuracy"] <= 1
    assert results["methods"]["intsgd-random"]["packets"] > 0
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["methods"].keys() == results["methods"].keys()
    assert written["provenance"]["torch"] and written["provenance"]["command"]


def test_compare_rejects_bad_options_before_starting():
    with pytest.raises(UsageError, match="--epochs 0"):
        compare(make_model, make_data, epochs=0)
    with pytest.raises(TypeError, match="no_such_option"):
        compare(make_model, make_data, no_such_option=1)


def test_callable_name_needs_an_importable_function():
    assert callable_name(make_model) == "switchagg.workers.examples.own_model:make_model"
    with pytest.raises(ValueError, match="top level"):
        callable_name(lambda: None)


def test_make_task_resolves_module_function():
    task = make_task("switchagg.workers.tasks.digits:Digits", hidden=(8,))
    assert task.name == "digits" and task.build_model().net[0].out_features == 8
    custom = make_task("custom", model="switchagg.workers.examples.own_model:make_model",
                       dataset="workers/examples/own_model.py:make_data")
    assert custom.metric == "accuracy" and len(custom.train_x) == 512
    with pytest.raises(ValueError, match="switchagg.workers.tasks.base.Task"):
        make_task("switchagg.workers.examples.own_model:make_model")
    with pytest.raises(ValueError, match="module:function"):
        make_task("custom", model="nocolon", dataset="switchagg.workers.examples.own_model:make_data")
