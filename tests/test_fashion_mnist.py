"""The fashion-mnist task: the IDX reader, the missing-package error, both models, a DDP run."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from switchagg.workers.data import (FASHION_MNIST_DIR, FASHION_MNIST_FILES, FASHION_MNIST_PACKAGE,
                          generator_for, load_fashion_mnist, read_idx)
from switchagg.workers.tasks import make_task

installed = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(FASHION_MNIST_DIR, f)) for f in FASHION_MNIST_FILES),
    reason=f"Fashion-MNIST files absent: apt-get install {FASHION_MNIST_PACKAGE}")


def _write_idx(path, array: np.ndarray, *, compress=True, type_byte=0x08) -> None:
    header = bytes([0, 0, type_byte, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)


def _fake_dataset(root, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    for name, n in zip(FASHION_MNIST_FILES, (n_train, n_train, n_test, n_test)):
        if "images" in name:
            _write_idx(root / name, rng.integers(0, 256, (n, 28, 28)))
        else:
            _write_idx(root / name, rng.integers(0, 10, n))


def test_read_idx_shapes_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    _write_idx(tmp_path / "a.idx", a, compress=False)
    assert np.array_equal(read_idx(str(tmp_path / "a.gz")), a)
    assert np.array_equal(read_idx(str(tmp_path / "a.idx")), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(tmp_path / "bad"))
    _write_idx(tmp_path / "f.gz", a, type_byte=0x0D)
    with pytest.raises(ValueError, match="0x0d unsupported"):
        read_idx(str(tmp_path / "f.gz"))
    with gzip.open(tmp_path / "short.gz", "wb") as f:   # header says 2x3x4, 5 bytes follow
        f.write(bytes([0, 0, 8, 3]) + np.array([2, 3, 4], ">u4").tobytes() + b"\x00" * 5)
    with pytest.raises(ValueError, match="5 data bytes follow"):
        read_idx(str(tmp_path / "short.gz"))


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=FASHION_MNIST_PACKAGE):
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--data"):
        make_task("fashion-mnist", data=str(tmp_path))


def test_data_option_reads_another_folder(tmp_path):
    _fake_dataset(tmp_path)
    task = make_task("fashion-mnist", data=str(tmp_path), model="lenet", train_size=30)
    assert len(task.train_x) == 30 and len(task.test_x) == 12
    x, y = next(iter(task.shard(1, 2, 5).batches(0, generator_for(0, "data", 1, 0))))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (5,)
    with pytest.raises(ValueError, match="choose one of fc, lenet"):
        make_task("fashion-mnist", data=str(tmp_path), model="resnet")


def test_preset_warms_up_then_decays():
    preset = make_task.__globals__["TASKS"]["fashion-mnist"].preset
    lrs = [preset.lr_at(e) for e in (0.0, 0.5, 1.0, 1.99, 2.0)]
    assert lrs[0] == pytest.approx(preset.lr / 10) and lrs[0] < lrs[1] < lrs[2] == preset.lr
    assert lrs[3] == preset.lr and lrs[4] == pytest.approx(preset.lr / 10)
    assert preset.momentum == 0.9


@installed
@pytest.mark.parametrize("model, params, floor", [
    ("fc", 784 * 1000 + 1000 + 1000 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10, 0.55),
    ("lenet", 61706, 0.25)])
def test_models_learn_on_a_slice(model, params, floor):
    task = make_task("fashion-mnist", model=model, train_size=512, test_size=500)
    assert task.describe()["train_images"] == 512
    torch.manual_seed(0)
    net = task.build_model()
    assert sum(p.numel() for p in net.parameters()) == params
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    before = task.evaluate(net)
    for epoch in range(3):
        for batch in task.shard(0, 1, 32).batches(epoch, generator_for(0, "data", 0, epoch)):
            opt.zero_grad()
            loss, _ = task.loss(net, batch, None)
            loss.backward()
            opt.step()
    after = task.evaluate(net)
    assert after["loss"] < before["loss"] and after["accuracy"] > floor   # chance: 0.1


@installed
def test_trains_through_ddp_with_intsgd_while_the_lr_warms_up():
    from tests.test_train import _run
    summaries, records = _run("intsgd-random", steps=6, task="fashion-mnist", model="lenet",
                              train_size=1000, test_size=200)
    steps = [r for r in records[0] if r["kind"] == "step"]
    lrs = [r["lr"] for r in steps]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1]          # every step a new (warm-up) lr
    assert [r["scaling"] for r in steps[1:]] == ["alpha"] * 5
    assert summaries[0]["params_digest"] == summaries[1]["params_digest"]
    assert summaries[0]["evaluation"]["accuracy"] > 0.1
