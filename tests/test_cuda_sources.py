"""The CUDA sources, verified without a GPU.

The per-element math of the kernels lives in `__host__ __device__` functions
(`switchagg/kernels/cuda/quantize_math.cuh`). Here it is compiled for the host, with nvcc (its host
pass) and with g++ (through the header's shim), into `tests/cuda_host_harness.cpp`, run on random
and edge-case inputs, and compared bit for bit with the numpy reference. Every `.cu` source is also
compiled to PTX for sm_80 and sm_90, and the PTX is checked for the kernels cupy will look up and
for float32 FMAs (which would change bits). Compiled artifacts are cached in the temp dir, keyed by
a hash of the sources and the command, never in the repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from switchagg.kernels import _numpy, philox4x32_10
from switchagg.kernels._philox import KNOWN_ANSWERS, element_bits

REPO = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO / "switchagg" / "kernels" / "cuda"
HARNESS = REPO / "tests" / "cuda_host_harness.cpp"
KERNELS = [f"sa_{k}_{t}" for k in ("quantize_random", "quantize_nearest", "block_max_abs_bits")
           for t in ("f32", "f16", "bf16")] + ["sa_dequantize", "sa_exponents", "sa_int_squared_norm"]
COMPILE_TIMEOUT_S = 120


def _build(command: list[str], sources: list[Path], output_name: str) -> Path:
    """Run a compiler once per (sources, command); return the cached output file."""
    digest = hashlib.sha256(" ".join(command).encode())
    for src in sorted(sources):
        digest.update(src.read_bytes())
    cache = Path(tempfile.gettempdir()) / f"switchagg-cuda-{os.getuid()}" / digest.hexdigest()[:24]
    target = cache / output_name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{output_name}.{os.getpid()}.partial"
    argv = [a.replace("{out}", str(partial)) for a in command]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stderr}"
    os.replace(partial, target)  # atomic: a concurrent run sees a whole file or none
    return target


def _sources() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cuh")) + sorted(CUDA_DIR.glob("*.cu"))


@pytest.fixture(scope="module", params=["nvcc", "g++"])
def harness(request) -> Path:
    """The host harness built by one compiler (skipped where that compiler is missing)."""
    compiler = shutil.which(request.param)
    if compiler is None:
        other = "g++" if request.param == "nvcc" else "nvcc"
        reason = f"{request.param} not found on PATH"
        if shutil.which(other) is None:
            reason += f" (nor {other}: the CUDA sources cannot be checked on this machine)"
        pytest.skip(reason)
    flags = ["-O2", "-std=c++17", f"-I{CUDA_DIR}", str(HARNESS), "-o", "{out}"]
    if request.param == "nvcc":
        command = [compiler, "-x", "cu", "-Xcompiler", "-ffp-contract=off", *flags]
    else:
        command = [compiler, "-ffp-contract=off", "-Wall", "-Werror", *flags]
    return _build(command, [HARNESS, *_sources()], "harness")


def _run(harness: Path, mode: str, n: int, arrays: list[np.ndarray], params=(), out_dtypes=()):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        src.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
        proc = subprocess.run([str(harness), mode, str(n), str(src), str(dst), *map(str, params)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        raw = dst.read_bytes()
    outs, pos = [], 0
    for dtype in out_dtypes:
        dtype, per = dtype if isinstance(dtype, tuple) else (dtype, 1)  # (dtype, values per item)
        size = n * per * np.dtype(dtype).itemsize
        outs.append(np.frombuffer(raw[pos:pos + size], dtype=dtype))
        pos += size
    assert pos == len(raw)
    return outs


def _edge_floats(rng, n: int) -> np.ndarray:
    """Random floats over many magnitudes, with ties, integers, zeros, subnormals, inf and NaN."""
    x = (rng.normal(size=n) * 2.0 ** rng.integers(-40, 40, size=n)).astype(np.float32)
    special = np.array([0.5, -0.5, 1.5, -2.5, 0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**31, -(2.0**31),
                        2.0**-149, -(2.0**-130), 3e38, 8388607.5, -8388608.5], dtype=np.float32)
    x[rng.integers(0, n, size=n // 10)] = rng.choice(special, size=n // 10)
    return x


def test_harness_philox_known_answers_and_random_counters(harness):
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(500, 6), dtype=np.uint64).astype(np.uint32)
    for i, (counter, key, _) in enumerate(KNOWN_ANSWERS):
        words[i] = counter + key  # tuples: the six input words
    (got,) = _run(harness, "philox", 500, [words], out_dtypes=[(np.uint32, 4)])
    got = got.reshape(500, 4)
    for i, (_, _, expected) in enumerate(KNOWN_ANSWERS):
        assert tuple(got[i].tolist()) == expected
    expected = np.stack([philox4x32_10(words[i:i + 1, :4], words[i, 4:])[0] for i in range(500)])
    assert (got == expected).all()


@pytest.mark.parametrize("rounding", ["random", "nearest"])
def test_harness_rounding_matches_numpy(harness, rounding):
    rng = np.random.default_rng(1 if rounding == "random" else 2)
    n, block = 20_000, 64
    x = _edge_floats(rng, n)
    scales = (2.0 ** rng.uniform(-10, 20, size=-(-n // block))).astype(np.float32)
    seed, rank, step, offset = 2**63 + 12345, 7, 2**32 - 1, 2**35 + 3
    lo, hi = -(2**30), 2**30 + 5
    expected = np.empty(n, np.int32)
    with np.errstate(over="ignore"):  # x * scale overflows to inf on purpose: it must clip
            count = _numpy.quantize(x, scales, block, rounding == "random", seed, rank, step, offset,
                                lo, hi, expected)
    s = np.repeat(scales, block)[:n]
    if rounding == "random":
        g = np.arange(offset, offset + n, dtype=np.uint64)
        values, clipped = _run(harness, "random", n, [x, s, g], (seed, rank, step, lo, hi),
                               [np.int32, np.int32])
    else:
        values, clipped = _run(harness, "nearest", n, [x, s], (lo, hi), [np.int32, np.int32])
    assert (values == expected).all()
    assert int(clipped.sum()) == count and count > 0


def test_harness_random_bits_follow_element_keying(harness):
    n = 64
    g = np.array([0, 1, 2, 3, 4, 2**32 * 4 + 1, 2**40 + 3] + list(range(100, 157)), dtype=np.uint64)
    # x = 0.5 exactly: the result is 1 iff bits / 2^32 < 0.5, i.e. the top bit of bits is clear
    x = np.full(n, 0.5, np.float32)
    values, _ = _run(harness, "random", n, [x, np.ones(n, np.float32), g], (99, 1, 2, -10, 10),
                     [np.int32, np.int32])
    bits = np.array([element_bits(99, 1, 2, int(gi), 1)[0] for gi in g])
    assert (values == (bits < 2**31)).all()


def test_harness_dequantize_matches_numpy(harness):
    rng = np.random.default_rng(3)
    n = 5000
    v = rng.integers(-(2**31), 2**31, size=n).astype(np.int32)
    v[:3] = [-(2**31), 2**31 - 1, 0]
    d = rng.uniform(1e-6, 1e6, size=n) * rng.choice([-1, 1], size=n)
    acc = rng.normal(size=n).astype(np.float32)
    q, a = _run(harness, "dequant", n, [v, d, acc], out_dtypes=[np.float32, np.float32])
    expected = (v.astype(np.float64) / d).astype(np.float32)
    assert q.view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    assert (a.view(np.uint32) == (acc + expected).view(np.uint32)).all()


def test_harness_exponents_match_numpy(harness):
    rng = np.random.default_rng(4)
    m = rng.integers(0, 0x7F800000, size=20_000, dtype=np.uint64).astype(np.uint32)
    m[:8] = [0, 1, 0x3FFFFF, 0x400000, 0x7FFFFF, 0x800000, 0x3F800000, 0x7F7FFFFF]
    (got,) = _run(harness, "exponent", m.size, [m], out_dtypes=[np.int32])
    assert (got == _numpy.exponents_from_max(m.view(np.float32))).all()


@pytest.mark.parametrize("mode", ["half", "bf16"])
def test_harness_narrow_floats_widen_exactly(harness, mode):
    h = np.arange(65536, dtype=np.uint16)  # every 16-bit pattern
    (got,) = _run(harness, mode, h.size, [h], out_dtypes=[np.float32])
    if mode == "half":
        expected = h.view(np.float16).astype(np.float32)
    else:
        expected = (h.astype(np.uint32) << 16).view(np.float32)
    assert (got.view(np.uint32) == expected.view(np.uint32)).all()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cuda_source_compiles_to_ptx(source, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: the PTX of the CUDA sources cannot be checked")
    ptx = _build([nvcc, "-ptx", f"-arch={arch}", "-Werror", "all-warnings", f"-I{CUDA_DIR}",
                  str(CUDA_DIR / source), "-o", "{out}"], _sources(), "kernels.ptx").read_text()
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    if source == "quantize.cu":
        assert set(KERNELS) <= entries
    assert "fma.rn.f32" not in ptx, "a float32 FMA would change the rounding of x * scale"
