"""The CUDA kernels against the CPU path (needs cupy and a device; skipped elsewhere).

Every kernel runs on the GPU and on the CPU (numpy, the oracle) over the same inputs; integers and
float bits must agree exactly. Also: torch CUDA tensors in and out through DLPack, and quantizing
straight into pinned host memory.
"""

from __future__ import annotations

import numpy as np
import pytest

import switchagg.kernels as K
from switchagg.kernels import _numpy

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")
if not cupy.is_available():
    pytest.skip("no CUDA device visible to cupy", allow_module_level=True)


@pytest.fixture(autouse=True)
def numpy_oracle(monkeypatch):
    monkeypatch.setattr(K, "_cpu_backend", _numpy)


def _floats(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=n) * 2.0 ** rng.integers(-20, 20, size=n)).astype(np.float32)
    x[rng.integers(0, n, size=n // 50)] = rng.choice(np.array([0.5, -1.5, 0.0, -0.0, np.inf, np.nan],
                                                              np.float32), size=n // 50)
    return x


@pytest.mark.parametrize("rounding", ["random", "deterministic"])
@pytest.mark.parametrize("per_block", [False, True])
def test_quantize_gpu_matches_cpu(rounding, per_block):
    n, block = 1_000_003, 64
    x = _floats(n, 1)
    scale = (2.0 ** np.random.default_rng(2).uniform(0, 20, size=-(-n // block))).astype(np.float32) \
        if per_block else 3.0e3
    kw = dict(rounding=rounding, seed=2**40 + 5, rank=3, step=11, offset=7, block=block,
              lo=-(2**24), hi=2**24)
    cpu = K.quantize(x, scale, **kw)
    gpu = K.quantize(cupy.asarray(x), scale, **kw)
    assert gpu.clipped == cpu.clipped
    assert (cupy.asnumpy(gpu.values) == cpu.values).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_gpu_narrow_inputs_match_cpu(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    x = torch.randn(100_000, dtype=getattr(torch, dtype), device="cuda")
    gpu = K.quantize(x, 100.0, seed=1)
    assert isinstance(gpu.values, torch.Tensor) and gpu.values.is_cuda
    cpu = K.quantize(x.float().cpu().numpy(), 100.0, seed=1)
    assert (gpu.values.cpu().numpy() == cpu.values).all()


def test_quantize_into_pinned_host_memory():
    from switchagg.kernels import _cupy
    x = _floats(300_000, 3)
    out = _cupy.pinned_empty(x.size, np.int32)
    res = K.quantize(cupy.asarray(x), 77.0, seed=4, out=out)
    assert res.values is out
    assert (out == K.quantize(x, 77.0, seed=4).values).all()


def test_dequantize_and_shift_updates_gpu_match_cpu():
    rng = np.random.default_rng(5)
    v = rng.integers(-(2**31), 2**31, size=500_000).astype(np.int32)
    divs = rng.uniform(0.1, 10.0, size=-(-v.size // 256))
    assert (cupy.asnumpy(K.dequantize(cupy.asarray(v), 3.7)) == K.dequantize(v, 3.7)).all()
    assert (cupy.asnumpy(K.dequantize(cupy.asarray(v), divs, block=256))
            == K.dequantize(v, divs, block=256)).all()
    acc = rng.normal(size=v.size).astype(np.float32)
    acc_gpu = cupy.asarray(acc)
    K.dequantize_add(cupy.asarray(v), 0.3, acc_gpu)
    K.dequantize_add(v, 0.3, acc)
    assert (cupy.asnumpy(acc_gpu).view(np.uint32) == acc.view(np.uint32)).all()


def test_block_max_and_exponents_gpu_match_cpu():
    x = _floats(100_000, 6)
    x[~np.isfinite(x)] = 1.0
    x[:640] = 0.0
    for block in (64, 100, 4096):
        gpu_m = K.block_max_abs(cupy.asarray(x), block)
        assert (cupy.asnumpy(gpu_m).view(np.uint32) == K.block_max_abs(x, block).view(np.uint32)).all()
        assert (cupy.asnumpy(K.block_exponents(cupy.asarray(x), block)) == K.block_exponents(x, block)).all()
    with pytest.raises(ValueError, match="inf or NaN"):
        K.block_exponents(cupy.asarray(np.array([1.0, np.nan], np.float32)), 64)


def test_int_squared_norm_gpu_is_exact():
    v = np.random.default_rng(7).integers(-(2**31), 2**31, size=2_000_000).astype(np.int32)
    v[:1000] = -(2**31)
    assert K.int_squared_norm(cupy.asarray(v)) == K.int_squared_norm(v)


def test_double_buffered_chunks_overlap_and_match_whole():
    """Quantize chunk c + 1 in a helper thread while chunk c is consumed (as the client sends it)."""
    from concurrent.futures import ThreadPoolExecutor

    from switchagg.kernels import _cupy
    x = cupy.asarray(_floats(8 * 65536, 8))
    chunk = 65536
    buffers = [_cupy.pinned_empty(chunk, np.int32) for _ in range(2)]
    whole = K.quantize(x, 99.0, seed=2, step=5).values.get()
    sent = []

    def job(c):
        return K.quantize(x[c * chunk:(c + 1) * chunk], 99.0, seed=2, step=5, offset=c * chunk,
                          out=buffers[c % 2])

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(job, 0)
        for c in range(8):
            done = pending.result(timeout=30)
            if c + 1 < 8:
                pending = pool.submit(job, c + 1)  # overlaps the "send" below
            sent.append(done.values.copy())
    assert (np.concatenate(sent) == whole).all()
