"""Tasks, models and data on tiny sizes: shards, losses, evaluation, the paper's presets and file formats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from switchagg.workers.data import (augment_crop_flip, batch_indices, batchify, contiguous_bounds, derive_seed,
                          generator_for, load_wikitext2, steps_per_epoch)
from switchagg.workers.models import LSTMLanguageModel, ResNet18
from switchagg.workers.tasks import TASKS, make_task, parse_options
from switchagg.workers.tasks.logreg import _objective


def _sgd_steps(task, steps=3, world_size=2, batch_size=4, lr=None):
    """Run a few plain local SGD steps on rank 0's shard; returns (losses, evaluation)."""
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.SGD(task.param_groups(model, task.preset.weight_decay), lr=lr or task.preset.lr)
    shard = task.shard(0, world_size, batch_size)
    losses, carry = [], None
    for i, batch in enumerate(shard.batches(0, generator_for(0, "data", 0, 0))):
        if i == steps:
            break
        opt.zero_grad()
        loss, carry = task.loss(model, batch, carry)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, task.evaluate(model)


# --- data -----------------------------------------------------------------------------------------

def test_contiguous_bounds_cover_in_order():
    bounds = contiguous_bounds(10, 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert sorted(b - a for a, b in bounds) == [3, 3, 4]
    with pytest.raises(ValueError, match="fewer workers"):
        contiguous_bounds(2, 3)


def test_steps_per_epoch_is_the_smallest_shards():
    assert steps_per_epoch(10, 3, 2) == 1          # shards 3, 3, 4 -> 3 // 2
    assert steps_per_epoch(10, 3, 8) == 1          # never zero


def test_batch_indices_seeded_and_complete():
    a = batch_indices(10, 3, 3, generator_for(7, "data", 0, 0))
    b = batch_indices(10, 3, 3, generator_for(7, "data", 0, 0))
    c = batch_indices(10, 3, 3, generator_for(7, "data", 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len(set(torch.cat(a).tolist())) == 9    # a permutation: no repeats within an epoch
    wrapped = batch_indices(3, 2, 4, generator_for(0, "x"))   # tiny shard: wraps around
    assert len(wrapped) == 4 and all(int(i.max()) < 3 for i in wrapped)


def test_derive_seed_stable_and_distinct():
    assert derive_seed(1, "data", 0, 2) == derive_seed(1, "data", 0, 2)
    assert len({derive_seed(1, "data", r, 0) for r in range(8)}) == 8
    assert derive_seed(1, "init") != derive_seed(2, "init")


def test_augment_crop_flip_shapes_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment_crop_flip(x, generator_for(0, "aug"), pad=2)
    assert out.shape == x.shape
    # pad=0: a crop of the whole image, only flips possible
    same = augment_crop_flip(x, generator_for(0, "aug"), pad=0)
    for i in range(2):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1))


def test_batchify_columns():
    cols = batchify(torch.arange(10), 3)
    assert cols.shape == (3, 3) and cols[:, 0].tolist() == [0, 1, 2] and cols[0, 1] == 3
    with pytest.raises(ValueError):
        batchify(torch.arange(3), 3)


def test_parse_options():
    assert parse_options(["hidden=(8,)", "lam=1e-3", "name=abc"]) == {"hidden": (8,), "lam": 1e-3,
                                                                      "name": "abc"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["oops"])


def test_make_task_unknown_names_listed():
    with pytest.raises(ValueError, match="digits"):
        make_task("mnist")
    with pytest.raises(ValueError, match="hidden"):
        make_task("digits", width=3)
    assert set(TASKS) == {"digits", "logreg", "fashion-mnist", "cifar10-resnet18", "wikitext2-lstm",
                          "custom"}


# --- logreg ---------------------------------------------------------------------------------------

def test_logreg_optimum_and_contiguous_shards():
    task = make_task("logreg")
    shard0 = task.shard(0, 4, 0)
    start, stop = contiguous_bounds(len(task.a), 4)[0]
    assert torch.allclose(shard0.x, torch.tensor(task.a[start:stop], dtype=torch.float32))
    assert shard0.steps_per_epoch == 1 and len(next(iter(shard0.batches(0, generator_for(0))))[0]) == stop
    _, grad, _ = _objective(task._x_star, task._chunks(4), task.lam)
    assert np.linalg.norm(grad) < 1e-10
    assert np.allclose(np.linalg.norm(task.a, axis=1), 1.0)     # the paper's row normalization
    model = task.build_model()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(task._x_star))
    ev = task.evaluate(model)
    assert abs(ev["suboptimality"]) < 1e-6 and ev["dist2"] < 1e-12 and ev["accuracy"] > 0.9


def test_logreg_gradient_descent_decreases_suboptimality():
    task = make_task("logreg", lam=1e-2)
    before = task.evaluate(task.build_model()) if task.shard(0, 1, 0) else None
    _, after = _sgd_steps(task, steps=1, world_size=1, batch_size=0)
    assert after["suboptimality"] < before["suboptimality"]


def test_logreg_reads_libsvm(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        label = 1 if i % 2 else -1
        feats = " ".join(f"{j + 1}:{rng.normal() + label:.3f}" for j in range(5))
        lines.append(f"{label} {feats}")
    path = tmp_path / "tiny.svm"
    path.write_text("\n".join(lines) + "\n")
    task = make_task("logreg", data=str(path))
    assert task.a.shape == (40, 5) and set(task.b) == {-1.0, 1.0}
    losses, ev = _sgd_steps(task, steps=1, world_size=2, batch_size=0)
    assert np.isfinite(losses[0]) and ev["suboptimality"] >= -1e-9


# --- digits ---------------------------------------------------------------------------------------

def test_digits_shards_differ_and_learn():
    task = make_task("digits", hidden=(16,))
    s0, s1 = task.shard(0, 2, 16), task.shard(1, 2, 16)
    assert s0.steps_per_epoch == s1.steps_per_epoch > 0
    assert not torch.equal(s0.x[:5], s1.x[:5])
    losses, ev = _sgd_steps(task, steps=30, world_size=2, batch_size=16, lr=0.1)
    assert set(ev) >= {"loss", "accuracy"}
    assert np.mean(losses[-5:]) < losses[0] and ev["accuracy"] > 0.5
    with pytest.raises(ValueError, match="bundled"):
        make_task("digits", data="/nowhere")


# --- CIFAR-10 -------------------------------------------------------------------------------------

def _write_cifar(root, n=6):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)


def test_cifar10_task_from_pickle_batches(tmp_path):
    _write_cifar(tmp_path)
    task = make_task("cifar10-resnet18", data=str(tmp_path), width=8)
    p = task.preset
    assert (p.lr, p.momentum, p.weight_decay, p.lr_milestones, p.epochs) == (0.1, 0.9, 1e-4, (150, 250), 300)
    assert task.train_x.shape == (30, 3, 32, 32) and task.test_x.shape == (6, 3, 32, 32)
    groups = task.param_groups(task.build_model(), 1e-4)
    assert groups[1]["weight_decay"] == 0 and all(q.ndim == 1 for q in groups[1]["params"])
    assert all(q.ndim > 1 for q in groups[0]["params"])
    losses, ev = _sgd_steps(task, steps=2, world_size=2, batch_size=4)
    assert all(np.isfinite(losses)) and 0 <= ev["accuracy"] <= 1
    assert abs(p.lr_at(149.9) - 0.1) < 1e-12 and abs(p.lr_at(150) - 0.01) < 1e-12
    assert abs(p.lr_at(260) - 0.001) < 1e-12


def test_cifar10_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        make_task("cifar10-resnet18", data=str(tmp_path))
    with pytest.raises(ValueError, match="--data"):
        make_task("cifar10-resnet18")


def test_resnet18_is_the_cifar_variant():
    model = ResNet18()
    assert sum(q.numel() for q in model.parameters()) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


# --- WikiText-2 -----------------------------------------------------------------------------------

def _write_wikitext(root):
    text = " = Title = \n the cat sat on the mat . \n a dog ran <unk> . \n"
    (root / "wiki.train.raw").write_text(text * 30)
    (root / "wiki.valid.raw").write_text(" the dog sat . \n" * 5)
    (root / "wiki.test.raw").write_text(" a cat ran zebra . \n" * 5)    # zebra -> <unk>


def test_wikitext2_tokenizer(tmp_path):
    _write_wikitext(tmp_path)
    corpus = load_wikitext2(str(tmp_path))
    v = corpus.vocab
    assert v.words[0] == "<eos>" and corpus.train[:3].tolist() == [v.index["="], v.index["Title"], v.index["="]]
    assert v.index["<unk>"] in corpus.test.tolist()
    assert corpus.train.numel() == 30 * (4 + 8 + 6)


def test_wikitext2_task_steps_and_perplexity(tmp_path):
    _write_wikitext(tmp_path)
    task = make_task("wikitext2-lstm", data=str(tmp_path), emsize=16, nhid=16, bptt=5)
    p = task.preset
    assert (p.lr, p.grad_clip, p.epochs, p.momentum, p.weight_decay) == (1.25, 0.4, 90, 0.0, 0.0)
    s0, s1 = task.shard(0, 2, 4), task.shard(1, 2, 4)
    assert s0.steps_per_epoch == s1.steps_per_epoch
    x, y = next(iter(s0.batches(0, generator_for(0))))
    assert torch.equal(x[1:], y[:-1])                               # targets are the next tokens
    losses, ev = _sgd_steps(task, steps=4, world_size=2, batch_size=4)
    assert all(np.isfinite(losses)) and ev["perplexity"] > 1 and "valid_perplexity" in ev


def test_lstm_preset_model_is_tied_650():
    task_defaults = TASKS["wikitext2-lstm"].option_defaults
    assert (task_defaults["emsize"], task_defaults["nhid"], task_defaults["nlayers"],
            task_defaults["dropout"], task_defaults["bptt"]) == (650, 650, 3, 0.4, 30)
    model = LSTMLanguageModel(100)
    assert model.decoder.weight is model.encoder.weight
    with pytest.raises(ValueError, match="tied"):
        LSTMLanguageModel(100, emsize=10, nhid=20)
