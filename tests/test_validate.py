"""Options checked before any process starts: named as typed, exit status 2, nothing left behind."""

from __future__ import annotations

import glob
import os
import tempfile
import time

import pytest
import torch

from tests.conftest import free_port
from switchagg.workers import cli


def _temp_runs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "switchagg-compare-*")))


@pytest.mark.parametrize("argv, named", [
    (["--drop", "-0.1"], "--drop -0.1"),
    (["--drop", "1"], "--drop 1"),
    (["--duplicate", "2"], "--duplicate 2"),
    (["--slots", "0"], "--slots 0"),
    (["--slots", "40000"], "--slots 40000"),
    (["--k", "63"], "--k 63"),
    (["--opt", "hidden=foo"], "--opt hidden=foo"),
    (["--opt", "nosuch=1"], "--opt nosuch=1"),
    (["--opt", "novalue"], "--opt"),
    (["--lr", "-1"], "--lr -1"),
    (["--lr", "nan"], "--lr nan"),
    (["--epochs", "0"], "--epochs 0"),
    (["--batch-size", "-3"], "--batch-size -3"),
    (["--max-steps", "0"], "--max-steps 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--timeout", "0"], "--timeout 0"),
    (["--workers", "0"], "--workers 0"),
    (["--methods", "sgd,nope"], "--methods sgd,nope"),
    (["--task", "nope"], "--task nope"),
    (["--task", "no_such_module:fn"], "--task no_such_module:fn"),
    (["--device", "tpu"], "--device tpu"),
])
def test_compare_usage_error_names_option_exits_2(argv, named, capsys):
    before = _temp_runs()
    started = time.monotonic()
    try:
        rc = cli.main(["compare", *argv])
    except SystemExit as exc:  # argparse's own checks (choices, types) exit 2 too
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    flag, _, value = named.partition(" ")
    assert err.startswith(f"switchagg compare: error: {named}") or (
        f"argument {flag}" in err and value in err), err
    assert "drop-ingress" not in err and "Traceback" not in err
    assert time.monotonic() - started < 10
    assert _temp_runs() == before  # nothing left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_compare_device_cuda_without_gpu(capsys):
    assert cli.main(["compare", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err


def test_compare_out_naming_a_file(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    assert cli.main(["compare", "--out", str(path)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert path.read_text() == "not a folder"


def test_worker_usage_error(capsys):
    assert cli.main(["worker", "--world-size", "2", "--rank", "2"]) == 2
    assert "--rank 2" in capsys.readouterr().err
    assert cli.main(["worker", "--switch", "switch:5555", "--world-size", "1"]) == 2
    assert "tcp://HOST:PORT" in capsys.readouterr().err


def test_worker_unreachable_switch_reported_within_seconds(capsys):
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    rc = cli.main(["worker", "--switch", address, "--world-size", "1", "--methods", "intsgd-random",
                   "--connect-timeout", "1.5", "--max-steps", "1"])
    elapsed = time.monotonic() - started
    assert rc == 1
    assert elapsed < 15
    err = capsys.readouterr().err
    assert address in err and "switch-emulator" in err


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    from switchagg.methods import METHODS
    assert "(default: 8192)" in out and "(default: digits)" in out and "(default: 4)" in out
    compact = "".join(out.split())  # argparse wraps (and hyphen-breaks) long help lines
    assert all(name in compact for name in METHODS) and "8,16,32,64,128" in compact
    assert "DESIGN.md" not in out and "measured-limits" not in out


@pytest.mark.parametrize("argv, named", [
    (["--workers", "0"], "--workers 0"), (["--slots", "0"], "--slots 0"),
    (["--burst", "0"], "--burst 0"), (["--drop", "-0.1"], "--drop -0.1"),
    (["--repeats", "0"], "--repeats 0"),
])
def test_bench_usage_error_before_start(argv, named, capsys):
    started = time.monotonic()
    assert cli.main(["bench", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"switchagg bench: error: {named}")
    assert time.monotonic() - started < 10
