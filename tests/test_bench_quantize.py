"""The quantize benchmark runs, reports every kernel beside copy bandwidth, and fails cleanly on cuda."""

from __future__ import annotations

import json

import pytest

from switchagg.workers import bench_quantize


def test_run_quantize_bench_reports_each_kernel_against_copy():
    result = bench_quantize.run_quantize_bench(numel=1 << 14, device="cpu", repeats=2)
    assert result["device"] == "cpu" and result["copy_GBps"] > 0
    for name in ("quantize_random", "quantize_deterministic", "quantize_random_per_block64",
                 "dequantize", "block_max_abs64"):
        assert result[f"{name}_GBps"] > 0
        assert result[f"{name}_ratio"] == pytest.approx(result[f"{name}_GBps"] / result["copy_GBps"],
                                                        rel=0.01, abs=2e-3)


def test_main_prints_json(capsys):
    assert bench_quantize.main(["--numel", "4096", "--repeats", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["numel"] == 4096


def test_main_on_cuda_without_a_gpu_names_what_is_missing(capsys):
    try:
        import cupy
        if cupy.is_available():
            pytest.skip("a CUDA device is present")
    except ImportError:
        pass
    assert bench_quantize.main(["--device", "cuda", "--numel", "1024"]) == 2
    assert "--device cpu" in capsys.readouterr().err
