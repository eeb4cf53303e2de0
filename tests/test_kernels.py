"""The CPU quantization kernels: every rule of `switchagg.kernels`, on each CPU backend.

Each test runs once per CPU backend (numpy, the oracle; numba, the fused default) through the public
interface, and the bit-for-bit comparison of numba with numpy is at the end.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import switchagg.kernels as K
from switchagg.kernels import INT32_MAX, INT32_MIN
from tests.conftest import REPO

CPU_BACKENDS = ["numpy", "numba"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    """Route the public interface to one CPU backend for the test."""
    module = importlib.import_module(f"switchagg.kernels._{request.param}")
    monkeypatch.setattr(K, "_cpu_backend", module)
    return request.param


def _q(x, scale=1.0, **kw):
    return K.quantize(np.asarray(x, dtype=np.float32), scale, **kw)


# --- randomized rounding ---------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.3, -0.3, 2.75, -1.5, 1e-3, -7.123, 0.5])
def test_random_rounding_is_unbiased_with_variance_at_most_a_quarter(backend, t):
    n = 40_000  # independent draws: one per element index
    r = _q(np.full(n, t), seed=7, rank=1, step=3).values.astype(np.float64)
    t32 = float(np.float32(t))
    lo = np.floor(t32)
    assert set(np.unique(r)) <= {lo, lo + 1}  # only the two neighbours
    p = t32 - lo
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(r.mean() - t32) < 5 * sigma + 1e-9
    assert r.var() <= 0.25 + 5 * 0.25 / np.sqrt(n)
    assert abs(r.var() - p * (1 - p)) < 0.01


def test_random_rounding_of_integers_is_exact(backend):
    x = np.array([0, 1, -1, 5, -1024, 2**23, -(2**24)], dtype=np.float32)
    assert (_q(x, seed=3).values == x.astype(np.int32)).all()


def test_random_rounding_is_reproducible_and_keyed(backend):
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    a = _q(x, 3.0, seed=1, rank=2, step=3).values
    assert (a == _q(x, 3.0, seed=1, rank=2, step=3).values).all()
    for kw in (dict(seed=2, rank=2, step=3), dict(seed=1, rank=3, step=3), dict(seed=1, rank=2, step=4)):
        assert (a != _q(x, 3.0, **kw).values).any()


@pytest.mark.parametrize("rounding", ["random", "deterministic"])
def test_quantize_pieces_equal_whole(backend, rounding):
    x = np.random.default_rng(1).normal(scale=10, size=1000).astype(np.float32)
    whole = _q(x, 1.7, rounding=rounding, seed=5, offset=13).values
    cuts = [0, 1, 3, 64, 65, 500, 1000]
    parts = [_q(x[a:b], 1.7, rounding=rounding, seed=5, offset=13 + a).values for a, b in zip(cuts, cuts[1:])]
    assert (np.concatenate(parts) == whole).all()


# --- deterministic rounding ------------------------------------------------------------------------

def test_deterministic_rounding_is_round_half_to_even(backend):
    x = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999998, 0.49999997, -3.5000002, 1e9 + 0.5]
    got = _q(x, rounding="deterministic").values
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 2, 0, -4, int(np.float32(1e9 + 0.5))]


def test_scale_is_applied_as_one_float32_multiply(backend):
    x = np.random.default_rng(2).normal(size=4096).astype(np.float32)
    scale = 1234.567  # not representable: rounded to float32 first
    t = x * np.float32(scale)
    assert (_q(x, scale, rounding="deterministic").values == np.rint(t).astype(np.int32)).all()


# --- clipping --------------------------------------------------------------------------------------

def test_clipping_at_the_exact_edges_is_counted(backend):
    x = [-10.0, 10.0, 10.4, -10.4, 10.6, -10.6, 11, -11, 1e30, -1e30]
    res = _q(x, rounding="deterministic", lo=-10, hi=10)
    assert res.values.tolist() == [-10, 10, 10, -10, 10, -10, 10, -10, 10, -10]
    assert res.clipped == 6


def test_clipping_at_the_int32_edges(backend):
    x = np.array([-(2.0**31), 2.0**31, 2.0**31 - 128, -(2.0**31) - 256, 3e9], dtype=np.float32)
    res = _q(x, rounding="deterministic")
    assert res.values.tolist() == [INT32_MIN, INT32_MAX, 2**31 - 128, INT32_MIN, INT32_MAX]
    assert res.clipped == 3
    res = _q(x, seed=1)  # integers: random rounding agrees
    assert res.values.tolist() == [INT32_MIN, INT32_MAX, 2**31 - 128, INT32_MIN, INT32_MAX]
    assert res.clipped == 3


def test_random_rounding_above_the_edge_is_counted(backend):
    res = _q(np.full(1000, 10.5), seed=9, lo=-10, hi=10)
    assert (res.values == 10).all()
    assert 400 < res.clipped < 600  # half the draws round up to 11 and are clipped


def test_non_finite_inputs_clip_and_count(backend):
    res = _q([np.inf, -np.inf, np.nan, 1.0], seed=1, lo=-5, hi=5)
    assert res.values.tolist() == [5, -5, 0, 1] and res.clipped == 3
    res = _q([np.nan], rounding="deterministic", lo=3, hi=5)
    assert res.values.tolist() == [3] and res.clipped == 1


# --- per-block scale, out, input kinds ------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["random", "deterministic"])
def test_per_block_scale_equals_scalar_scale_per_block(backend, rounding):
    x = np.random.default_rng(3).normal(size=200).astype(np.float32)
    scales = np.array([1.0, 1000.0, 3.25, 2.0**-10], dtype=np.float32)
    got = _q(x, scales, block=64, rounding=rounding, seed=4).values
    for b, s in enumerate(scales):
        part = _q(x[64 * b:64 * (b + 1)], float(s), rounding=rounding, seed=4, offset=64 * b).values
        assert (got[64 * b:64 * (b + 1)] == part).all()


def test_quantize_writes_into_out(backend):
    x = np.arange(10, dtype=np.float32)
    out = np.full(10, -1, dtype=np.int32)
    res = K.quantize(x, 2.0, rounding="deterministic", out=out)
    assert res.values is out and out.tolist() == list(range(0, 20, 2))


def test_quantize_accepts_other_float_dtypes(backend):
    x = np.random.default_rng(4).normal(size=300)
    for dtype in (np.float64, np.float16):
        a = K.quantize(x.astype(dtype), 100.0, seed=2).values
        assert (a == _q(x.astype(dtype).astype(np.float32), 100.0, seed=2).values).all()


def test_quantize_torch_tensors_round_trip_as_torch(backend):
    x = torch.randn(257)
    res = K.quantize(x, 50.0, seed=3, rank=1)
    assert isinstance(res.values, torch.Tensor) and res.values.dtype == torch.int32
    assert (res.values.numpy() == _q(x.numpy(), 50.0, seed=3, rank=1).values).all()
    xb = x.to(torch.bfloat16)
    vb = K.quantize(xb, 50.0, seed=3).values
    assert (vb.numpy() == _q(xb.float().numpy(), 50.0, seed=3).values).all()


# --- dequantize ------------------------------------------------------------------------------------

def test_dequantize_is_float64_division_rounded_once(backend):
    s = np.random.default_rng(5).integers(INT32_MIN, INT32_MAX, size=1000, endpoint=True).astype(np.int32)
    d = 3 * 0.1234567891
    expected = (s.astype(np.float64) / d).astype(np.float32)
    assert (K.dequantize(s, d) == expected).all()
    out = np.empty(1000, np.float32)
    assert K.dequantize(s, d, out=out) is out and (out == expected).all()
    divs = np.array([0.5, 3.0, 7.1, 1e-6])
    per_block = (s.astype(np.float64) / np.repeat(divs, 256)[:1000]).astype(np.float32)
    assert (K.dequantize(s, divs, block=256) == per_block).all()


def test_dequantize_add_updates_in_place(backend):
    rng = np.random.default_rng(6)
    q = rng.integers(-1000, 1000, size=500).astype(np.int32)
    h = rng.normal(size=500).astype(np.float32)
    expected = h + (q.astype(np.float64) / 0.37).astype(np.float32)
    assert K.dequantize_add(q, 0.37, h) is h
    assert (h == expected).all()
    ht = torch.zeros(500)
    K.dequantize_add(torch.from_numpy(q), 2.0, ht)
    assert (ht.numpy() == q / 2.0).all()


def test_quantize_dequantize_round_trip_error_is_below_one_step(backend):
    x = np.random.default_rng(7).normal(size=10_000).astype(np.float32)
    alpha = 2.0**12
    back = K.dequantize(_q(x, alpha, seed=1).values, alpha)
    assert np.abs(back - x).max() <= 1.0 / alpha


# --- block max and exponents -----------------------------------------------------------------------

def test_block_max_abs_matches_numpy(backend):
    x = np.random.default_rng(8).normal(size=1000).astype(np.float32)
    got = K.block_max_abs(x, 64)
    padded = np.zeros(16 * 64, np.float32)
    padded[:1000] = np.abs(x)
    assert got.dtype == np.float32 and (got == padded.reshape(16, 64).max(axis=1)).all()


def test_block_max_abs_propagates_nan_and_ignores_signed_zero(backend):
    x = np.array([1.0, np.nan, -3.0, -0.0, -0.0, 0.0, -np.inf, 2.0], dtype=np.float32)
    got = K.block_max_abs(x, 3)
    assert np.isnan(got[0]) and got[1] == 0.0 and not np.signbit(got[1]) and got[2] == np.inf


def test_block_exponents_follow_frexp(backend):
    rng = np.random.default_rng(9)
    x = (rng.normal(size=64 * 200) * 2.0 ** rng.integers(-140, 120, size=64 * 200)).astype(np.float32)
    got = K.block_exponents(x, 64)
    m = np.abs(x).reshape(200, 64).max(axis=1)
    e = np.clip(np.frexp(m)[1], -127, 127)
    assert got.dtype == np.int8 and (got == e).all()


def test_block_exponents_edges(backend):
    tiny = np.float32(2.0**-149)  # smallest subnormal: frexp exponent -148, clamped
    big_sub = np.nextafter(np.float32(2.0**-126), np.float32(0))  # largest subnormal: exponent -126
    cases = [0.0, -0.0, tiny, big_sub, 2.0**-126, 0.75, 1.0, -1.0, 2.0**126, np.finfo(np.float32).max]
    got = K.block_exponents(np.array(cases, dtype=np.float32), 1)
    assert got.tolist() == [-128, -128, -127, -126, -125, 0, 1, 1, 127, 127]
    assert K.block_exponents(np.zeros(130, np.float32), 64).tolist() == [-128] * 3


def test_block_exponents_reject_non_finite(backend):
    with pytest.raises(ValueError, match="block 1 "):
        K.block_exponents(np.array([1, 2, np.inf, 3], np.float32), 2)
    with pytest.raises(ValueError, match="inf or NaN"):
        K.block_exponents(np.array([np.nan], np.float32), 4)


# --- exact squared norm ----------------------------------------------------------------------------

def test_int_squared_norm_is_exact_at_int32_extremes(backend):
    v = np.array([INT32_MIN] * 1000 + [INT32_MAX] * 1000 + [-1, 0, 1, 46341], dtype=np.int32)
    assert K.int_squared_norm(v) == sum(int(a) ** 2 for a in v.tolist())
    assert K.int_squared_norm(np.zeros(0, np.int32)) == 0


def test_int_squared_norm_random(backend):
    v = np.random.default_rng(10).integers(INT32_MIN, INT32_MAX, size=5000, endpoint=True).astype(np.int32)
    assert K.int_squared_norm(torch.from_numpy(v)) == sum(int(a) ** 2 for a in v.tolist())


# --- argument errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(rounding="stochastic"), "rounding"),
    (dict(lo=5, hi=4), "lo=5"),
    (dict(hi=2**31), "hi=2147483648"),
    (dict(seed=-1), "seed"),
    (dict(offset=2**62), "offset"),
    (dict(offset=-1), "offset"),
    (dict(out=np.zeros(3, np.int64)), "out must be"),
    (dict(out=np.zeros(2, np.int32)), "length 3"),
])
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        K.quantize(np.zeros(3, np.float32), 1.0, **kwargs)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="1-D"):
        K.quantize(np.zeros((2, 2), np.float32), 1.0)
    with pytest.raises(TypeError, match="float32"):
        K.quantize(np.zeros(3, np.int32), 1.0)
    with pytest.raises(ValueError, match="one value per block"):
        K.quantize(np.zeros(130, np.float32), np.ones(2, np.float32), block=64)
    with pytest.raises(ValueError, match="not finite"):
        K.quantize(np.zeros(3, np.float32), 1e39)
    with pytest.raises(ValueError, match="nonzero"):
        K.dequantize(np.zeros(3, np.int32), 0.0)
    with pytest.raises(TypeError, match="int32"):
        K.dequantize(np.zeros(3, np.int64), 1.0)


# --- numba against the numpy oracle, bit for bit ---------------------------------------------------

def _random_floats(rng, n, dtype):
    """Gradient-like values over many magnitudes, with exact ties, integers and signed zeros mixed in."""
    span = 10 if dtype == np.float16 else 30  # float16 overflows at 65504
    x = rng.normal(size=n) * 2.0 ** rng.integers(-span, span, size=n)
    x[rng.random(n) < 0.05] = rng.integers(-100, 100, size=1)[0] + 0.5
    x[rng.random(n) < 0.02] = -0.0
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("rounding", ["random", "deterministic"])
def test_numba_matches_numpy_bit_for_bit(monkeypatch, dtype, rounding):
    from switchagg.kernels import _numba, _numpy
    rng = np.random.default_rng(hash((np.dtype(dtype).name, rounding)) % 2**32)
    for trial in range(4):
        n = int(rng.integers(1, 70_000))
        x = _random_floats(rng, n, dtype)
        block = int(rng.choice([16, 64, 1000]))
        scale = (2.0 ** rng.uniform(-5, 25, size=-(-n // block))).astype(np.float32) if trial % 2 else 3.3e4
        kw = dict(rounding=rounding, seed=int(rng.integers(0, 2**64, dtype=np.uint64)),
                  rank=int(rng.integers(0, 2**32)), step=int(rng.integers(0, 2**32)),
                  offset=int(rng.integers(0, 2**40)), block=block, lo=-(2**20), hi=2**20 + 3)
        results = {}
        for module in (_numpy, _numba):
            monkeypatch.setattr(K, "_cpu_backend", module)
            results[module] = K.quantize(x, scale, **kw)
        assert results[_numpy].clipped == results[_numba].clipped
        assert (results[_numpy].values == results[_numba].values).all()
        s = results[_numpy].values
        for module in (_numpy, _numba):
            monkeypatch.setattr(K, "_cpu_backend", module)
            acc = x.astype(np.float32)
            K.dequantize_add(s, 7.77, acc)
            results[module] = (K.dequantize(s, scale, block=block), K.block_max_abs(x, block),
                               K.block_exponents(x, block), K.int_squared_norm(s), acc)
        for a, b in zip(results[_numpy], results[_numba]):
            if isinstance(a, int):
                assert a == b
            else:
                assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# --- numba's multi-threaded kernels against the numpy oracle --------------------------------------

@pytest.fixture
def parallel_numba(monkeypatch):
    """Numba routed through its parallel kernels from 3 tiles up, on 2 threads; yields the calls made.

    The threshold is lowered so that sizes straddling it, and the chunk boundaries of the parallel
    split (CHUNK_TILES tiles), stay small enough for a fast test.
    """
    import numba

    from switchagg.kernels import _numba, _numba_impl
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("NUMBA_NUM_THREADS < 2: the parallel kernels never run")
    previous = numba.get_num_threads()
    numba.set_num_threads(2)
    monkeypatch.setattr(K, "_cpu_backend", _numba)
    monkeypatch.setattr(_numba, "PARALLEL_MIN_ELEMENTS", 3 * 4 * _numba_impl.TILE_GROUPS)
    calls = []
    for name in ("quantize_random_parallel", "quantize_nearest_parallel"):
        kernel = getattr(_numba_impl, name)
        monkeypatch.setattr(_numba_impl, name,
                            lambda *a, _k=kernel, _n=name: calls.append((_n, a[0].size)) or _k(*a))
    yield calls
    numba.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("rounding", ["random", "deterministic"])
def test_parallel_numba_matches_numpy_bit_for_bit(monkeypatch, parallel_numba, dtype, rounding):
    from switchagg.kernels import _numba, _numba_impl, _numpy
    tile = 4 * _numba_impl.TILE_GROUPS
    chunk = _numba_impl.CHUNK_TILES * tile
    threshold = _numba.PARALLEL_MIN_ELEMENTS
    rng = np.random.default_rng(hash(("parallel", np.dtype(dtype).name, rounding)) % 2**32)
    # (size, offset): just below / at / above the threshold, and across 1-2 chunk boundaries of the
    # split, with offsets that misalign the tiles from x[0] (random rounding's tiles are global).
    cases = [(threshold - 1, 0), (threshold, 0), (threshold + 1, 2), (chunk - 1, 4 * tile - 3),
             (chunk + 1, 0), (2 * chunk + 5, 1), (2 * chunk + tile + 3, 2**40 + 5)]
    for trial, (n, offset) in enumerate(cases):
        x = _random_floats(rng, n, dtype)
        block = int(rng.choice([16, 64, 1000]))
        scale = (2.0 ** rng.uniform(-5, 25, size=-(-n // block))).astype(np.float32) if trial % 2 else 3.3e4
        kw = dict(rounding=rounding, seed=int(rng.integers(0, 2**64, dtype=np.uint64)),
                  rank=int(rng.integers(0, 2**32)), step=int(rng.integers(0, 2**32)),
                  offset=offset, block=block, lo=-(2**20), hi=2**20 + 3)
        got = K.quantize(x, scale, **kw)
        monkeypatch.setattr(K, "_cpu_backend", _numpy)
        want = K.quantize(x, scale, **kw)
        monkeypatch.setattr(K, "_cpu_backend", _numba)
        assert got.clipped == want.clipped and (got.values == want.values).all(), (n, offset)
    used = [size for _, size in parallel_numba]
    assert used == [n for n, _ in cases if n >= threshold]  # and never below the threshold


def test_parallel_numba_steps_aside_for_one_thread_or_a_busy_lock(parallel_numba):
    import numba

    from switchagg.kernels import _numba
    x = np.random.default_rng(12).normal(scale=100, size=_numba.PARALLEL_MIN_ELEMENTS).astype(np.float32)
    want = K.quantize(x, 1.0, seed=5, step=2)
    assert len(parallel_numba) == 1
    numba.set_num_threads(1)  # a caller that asked numba for one thread gets the serial kernel
    one_thread = K.quantize(x, 1.0, seed=5, step=2)
    numba.set_num_threads(2)
    with _numba._parallel_lock:  # another thread is running a parallel kernel: run serial meanwhile
        busy = K.quantize(x, 1.0, seed=5, step=2)
    assert len(parallel_numba) == 1
    assert (one_thread.values == want.values).all() and (busy.values == want.values).all()


# --- device selection ------------------------------------------------------------------------------

def test_require_cuda_names_what_is_missing():
    try:
        import cupy
        if cupy.is_available():
            pytest.skip("a CUDA device is present: nothing is missing")
    except ImportError:
        pass
    with pytest.raises(K.DeviceUnavailable, match="cupy|CUDA driver|CUDA device") as info:
        K.require_cuda()
    assert isinstance(info.value, RuntimeError) and "--device cpu" in str(info.value)


LAZY = """
import os, sys
os.environ.pop("SWITCHAGG_CPU_KERNELS", None)
import numpy as np
import switchagg.kernels as K
from switchagg import _stream
from switchagg._stream import StreamMachine
from switchagg.kernels import _numpy
small = np.linspace(-3, 3, K.NUMBA_MIN_ELEMENTS - 1, dtype=np.float32)
got = K.quantize(small, 1000.0, rounding="random", seed=3).values
want = np.empty(small.size, np.int32)
_numpy.quantize(small, np.full(1, 1000.0, np.float32), 1, True, 3, 0, 0, 0, K.INT32_MIN,
                K.INT32_MAX, want)
assert (got == want).all()
machine = StreamMachine(job_id=0, rank=0, k=8, slots=16, burst=8, compiled=None)
assert "numba" not in sys.modules and machine._jit is None, "a small call loaded numba"
big = np.linspace(-3, 3, K.NUMBA_MIN_ELEMENTS, dtype=np.float32)
K.quantize(big, 1000.0, rounding="random", seed=3)
assert K._cpu_backend is not None and K.cpu_backend_name() == "numba"
assert (K.quantize(small, 1000.0, rounding="random", seed=3).values == want).all()
machine.refresh_kernels()
assert machine._jit is None  # the stream's loops load only on their own first large call
_stream.load_kernels()
machine.refresh_kernels()
assert machine._jit is not None
print("ok")
"""


def test_small_calls_never_load_numba_and_a_large_one_loads_it_for_every_call():
    env = {k: v for k, v in os.environ.items() if k != "SWITCHAGG_CPU_KERNELS"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", LAZY], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
