"""Quantization kernels: scale + round + clip to int32, the inverse, block maxima, exact integer norms.

Start here if you quantize a gradient. This module owns the public interface (agreed in
kernel_interface.md) and picks a backend per call by what it was given:

    numpy array / CPU torch tensor  -> numba fused kernels (`_numba`), or numpy (`_numpy`) without numba
    CUDA torch tensor / cupy array   -> cupy RawModule kernels from `cuda/quantize.cu` (`_cupy`)

Every backend returns bit-identical integers for the same inputs: randomized rounding draws from
Philox4x32-10 keyed by (seed, rank, step) and indexed by global element index (`_philox`), and the
per-element arithmetic is pinned down in `_numpy` (the oracle) and `cuda/quantize_math.cuh`.

What this module must never do: compute (it validates, converts and dispatches), import numba or cupy
at import time, or copy floats off a GPU. Torch tensors reach numpy through `.numpy()` and cupy
through DLPack, both zero-copy; results come back as the kind of array that went in.

Set SWITCHAGG_CPU_KERNELS=numpy to force the numpy backend on CPU (numba is the default).

Loading numba costs a process about half a CPU second even from a warm cache (its import and
LLVM's start), as much as four small DDP ranks' whole first step on two cores. So, unless the
variable forces a backend, CPU calls of fewer than `NUMBA_MIN_ELEMENTS` elements run on numpy
(the same integers) until a larger call, or `warm_up`, has loaded numba; from then on every CPU
call uses it. That first large call loads (or, on a cold cache, compiles under the compile lock)
in the calling thread: `load_for(numel)` lets a caller do it in a thread of its choice first.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, NamedTuple

import numpy as np

from switchagg._choices import check_choice
from switchagg.errors import DeviceUnavailable
from switchagg.kernels._numba import PARALLEL_MIN_ELEMENTS
from switchagg.kernels._philox import philox4x32_10

__all__ = ["QuantizeResult", "DeviceUnavailable", "quantize", "dequantize", "dequantize_add",
           "block_max_abs", "block_exponents", "int_squared_norm", "philox4x32_10",
           "cpu_backend_name", "warm_up", "load_for", "require_cuda", "INT32_MIN", "INT32_MAX",
           "PARALLEL_MIN_ELEMENTS", "NUMBA_MIN_ELEMENTS", "HOST_FLOAT_COPIES"]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
#: CPU backend name -> module. The numpy one is the oracle the others are tested against.
_CPU_BACKENDS = {"numba": "switchagg.kernels._numba", "numpy": "switchagg.kernels._numpy"}
_cpu_backend: Any = None  # once chosen (and loaded), every CPU call's backend
#: Below this many elements a CPU call does not load numba (numpy serves it, bit for bit the
#: same): 64 Ki elements take numpy about a millisecond to quantize, and a process whose calls
#: are all smaller (a small model's DDP buckets) never pays numba's half-second load.
NUMBA_MIN_ELEMENTS = 1 << 16
#: Float elements the dispatch had to copy or convert on the host (a float16/64 tensor, a
#: non-contiguous view): 0 for contiguous float32 gradients. Tests read it.
HOST_FLOAT_COPIES = [0]


class QuantizeResult(NamedTuple):
    """What `quantize` returns: the int32 values and how many elements were clipped."""

    values: Any
    clipped: int


def cpu_backend_name() -> str:
    """Name of the CPU backend in use ('numba' or 'numpy')."""
    return _cpu().__name__.rsplit("._", 1)[-1]


def _cpu(n: int | None = None):
    """The CPU backend for a call of `n` elements (None: the backend of large calls)."""
    global _cpu_backend
    if _cpu_backend is not None:
        return _cpu_backend
    if n is not None and n < NUMBA_MIN_ELEMENTS and not os.environ.get("SWITCHAGG_CPU_KERNELS",
                                                                        "").strip():
        return importlib.import_module(_CPU_BACKENDS["numpy"])
    if _cpu_backend is None:
        wanted = os.environ.get("SWITCHAGG_CPU_KERNELS", "").strip().lower()
        if wanted and wanted not in _CPU_BACKENDS:
            raise ValueError(f"SWITCHAGG_CPU_KERNELS={wanted!r}: choose one of {sorted(_CPU_BACKENDS)}")
        names = [wanted] if wanted else ["numba", "numpy"]
        for name in names:
            try:
                module = importlib.import_module(_CPU_BACKENDS[name])
                if getattr(module, "available", lambda: True)():
                    _cpu_backend = module
                    break
            except ImportError:
                continue
        else:
            raise ImportError(f"CPU kernel backend {names[0]!r} is not importable")
        warm_up()  # load every serial kernel now (a cold cache compiles once, under the lock)
    return _cpu_backend


def load_for(numel: int) -> None:
    """Load (or compile) now, in this thread, the CPU kernels that calls of `numel` elements use.

    A caller whose calls will run in a thread that must not stall (a switch client's engine
    thread runs a look-ahead stream's fill) calls it first from its own thread.
    """
    _cpu(numel)


def warm_up(parallel: bool = False) -> None:
    """Load (or compile, on a cold cache) the CPU kernels now rather than on their first use.

    A process that will quantize on CPU calls it before it joins a switch: a compilation takes
    seconds (and holds the GIL, so a client's heartbeats would stop), a warm numba cache well
    under one. With the numpy backend it does nothing.

    Args:
        parallel: also load the multi-threaded kernels that large calls (PARALLEL_MIN_ELEMENTS
            or more, e.g. a whole large gradient) use. Ask for them only where such calls will
            come: once run, their threads compete with torch's for the cores.

    On a cold cache the kernels compile once per machine: processes that start together wait
    for the first one's compilation (a file lock, `switchagg._compile`), which prints what it
    does and how long it took.
    """
    backend = _cpu()
    warm = getattr(backend, "warm_up", None)
    if warm is None:
        return
    from switchagg._compile import compile_once
    compile_once("CPU quantize kernels" + (" (with the parallel ones)" if parallel else ""),
                 lambda: warm(parallel=parallel), backend.dispatchers(parallel))


def require_cuda():
    """The cupy backend module, or a DeviceUnavailable that names what is missing.

    Raises:
        DeviceUnavailable: cupy not installed, no CUDA driver/runtime, or no visible device.
    """
    from switchagg.kernels import _cupy
    _cupy.check_available()
    return _cupy


# --- operands: whatever came in, as an array the chosen backend takes, plus how to wrap results ----

class _Operand(NamedTuple):
    backend: Any      # module with the backend contract (see _numpy)
    array: Any        # numpy float32/int32 (CPU) or cupy array (CUDA)
    tag: str          # element type on CUDA: "f32", "f16", "bf16" (CPU: always "f32" after conversion)
    torch: bool       # results go back as torch tensors


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda")


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


def _float_operand(x, name: str = "x") -> _Operand:
    """x as a 1-D float operand: float32 numpy on CPU (others converted), native dtype on CUDA."""
    if _is_torch(x):
        import torch  # already loaded: x is a tensor
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}; pass x.view(-1)")
        x = x.detach()
        if x.is_cuda:
            tags = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
            if x.dtype == torch.float64:
                x = x.float()
            if x.dtype not in tags:
                raise TypeError(f"{name} has dtype {x.dtype}; expected float32/float16/bfloat16/float64")
            tag = tags[x.dtype]
            if tag == "bf16":  # cupy has no bfloat16: pass the bits, the kernel reads them as bf16
                x = x.view(torch.int16)
            return _cuda_operand(x.contiguous(), tag, torch_out=True)
        if not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}; expected a floating point tensor")
        if x.dtype != torch.float32 or not x.is_contiguous():
            HOST_FLOAT_COPIES[0] += x.numel()
        if x.dtype != torch.float32:
            x = x.float()  # bf16/fp16/fp64 -> float32 (exact for bf16/fp16; nearest for fp64)
        return _Operand(_cpu(x.numel()), np.ascontiguousarray(x.numpy()), "f32", True)
    if _is_cupy(x):
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
        if x.dtype == np.float64:
            x = x.astype(np.float32)
        tags = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
        if x.dtype not in tags:
            raise TypeError(f"{name} has dtype {x.dtype}; expected float32/float16/float64")
        return _cuda_operand(x, tags[x.dtype], torch_out=False)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}; pass x.reshape(-1)")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} has dtype {a.dtype}; expected float32 (float16/float64 accepted)")
    return _Operand(_cpu(a.size), np.ascontiguousarray(a, dtype=np.float32), "f32", False)


def _cuda_operand(x, tag: str, torch_out: bool) -> _Operand:
    cp_backend = require_cuda()
    return _Operand(cp_backend, cp_backend.as_cupy(x), tag, torch_out)


def _int_operand(a, like: _Operand | None = None, name: str = "sums") -> _Operand:
    """An int32 1-D operand on the same side (CPU/CUDA) as `like`, or wherever it lives."""
    if _is_torch(a):
        a = a.detach()
        if a.is_cuda:
            import torch
            if a.dtype != torch.int32:
                raise TypeError(f"{name} has dtype {a.dtype}; expected int32")
            return _cuda_operand(a.contiguous(), "i32", torch_out=True)
        a, torch_out = a.numpy(), True
    elif _is_cupy(a):
        if a.dtype != np.int32:
            raise TypeError(f"{name} has dtype {a.dtype}; expected int32")
        return _cuda_operand(a, "i32", torch_out=False)
    else:
        a, torch_out = np.asarray(a), False
    if a.ndim != 1 or a.dtype != np.int32:
        raise TypeError(f"{name} must be a 1-D int32 array, got {a.dtype} of shape {a.shape}")
    return _Operand(_cpu(a.size), np.ascontiguousarray(a), "i32", torch_out)


def _wrap(value, operand: _Operand):
    """Give a result back as the kind of array that came in (torch <- numpy/cupy via zero copy)."""
    if not operand.torch:
        return value
    import torch
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.from_dlpack(value)


def _output(out, expected_dtype, n: int, x: _Operand, name: str = "out"):
    """Check a caller's `out` (same side, dtype, length); return (backend array, object to return)."""
    if out is None:
        return None, None
    if _is_torch(out):
        if out.is_cuda != (x.backend.__name__.endswith("_cupy")):
            raise ValueError(f"{name} must live on the same device as the input")
        arr = x.backend.as_cupy(out) if out.is_cuda else out.numpy()
    elif _is_cupy(out):
        if not x.backend.__name__.endswith("_cupy"):
            raise ValueError(f"{name} is a cupy array but the input lives on the CPU")
        arr = out
    else:
        arr = out
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be an array, got {type(out).__name__}")
        if x.backend.__name__.endswith("_cupy") and not x.backend.is_host_staging(arr):
            raise ValueError(f"{name} is host memory but the input is on the GPU; "
                             "allocate it with switchagg.kernels._cupy.pinned_empty")
    if arr.dtype != expected_dtype or arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D {np.dtype(expected_dtype).name} array of length {n}, "
                         f"got {arr.dtype} of shape {tuple(arr.shape)}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
    return arr, out


def _check_block(block) -> int:
    if block is None or int(block) != block or int(block) <= 0:
        raise ValueError(f"block={block!r} must be a positive integer (elements per block)")
    return int(block)


def _per_block(values, n: int, block, name: str, dtype, backend):
    """A scalar as dtype, or a per-block array checked against ceil(n / block)."""
    if np.ndim(values) == 0 and not (_is_torch(values) and values.dim() > 0):
        with np.errstate(over="ignore"):  # too large for float32 becomes inf: rejected just below
            v = dtype(float(values))
        if not np.isfinite(v):
            raise ValueError(f"{name}={values!r} is not finite as {np.dtype(dtype).name}")
        return v, 1
    block = _check_block(block)
    if _is_torch(values):
        values = values.detach().cpu().numpy()
    v = values if _is_cupy(values) else np.asarray(values)
    v = v.astype(dtype, copy=False)
    if v.ndim != 1 or v.shape[0] != -(-n // block):
        raise ValueError(f"{name} must hold one value per block of {block}: expected "
                         f"{-(-n // block)}, got shape {tuple(v.shape)}")
    return backend.per_block_array(v) if hasattr(backend, "per_block_array") else v, block


# --- the interface ---------------------------------------------------------------------------------

def quantize(x, scale, *, rounding: str = "random", seed: int = 0, rank: int = 0, step: int = 0,
             offset: int = 0, block: int | None = None, lo: int | None = None, hi: int | None = None,
             out=None) -> QuantizeResult:
    """Scale, round and clip floats to int32 in one pass: values = clip(Round(fl32(x * scale)), lo, hi).

    Args:
        x: 1-D float array or tensor (float32; float64/float16/bfloat16 computed as float32).
        scale: a float (applied as float32), or one float32 scale per consecutive block of `block`
            elements (SwitchML's per-packet scale).
        rounding: "random" (unbiased: floor(t) + [u < frac(t)], u from Philox4x32-10) or
            "deterministic" (round half to even).
        seed, rank, step: the random stream (seed < 2^64, rank and step < 2^32).
        offset: global index of x[0], so pieces quantized apart give the same bits as the whole.
        block: elements per scale when `scale` is an array.
        lo, hi: clip bounds (default: the int32 range). NaN becomes clip(0) and counts as clipped.
        out: optional preallocated int32 output of the same length (on the GPU path: a device array,
            or pinned host memory from `_cupy.pinned_empty` that the kernel writes directly).

    Returns:
        QuantizeResult(values, clipped): values of the kind that came in (`out` itself if given).

    Raises:
        ValueError / TypeError: bad arguments (the message names the parameter).
        DeviceUnavailable: x is on a GPU but cupy or the device is missing.
    """
    check_choice("rounding", rounding)
    lo = INT32_MIN if lo is None else int(lo)
    hi = INT32_MAX if hi is None else int(hi)
    if not INT32_MIN <= lo <= hi <= INT32_MAX:
        raise ValueError(f"clip bounds lo={lo}, hi={hi} must satisfy -2^31 <= lo <= hi <= 2^31 - 1")
    from switchagg.kernels._philox import check_stream_ids
    check_stream_ids(seed, rank, step, offset)
    op = _float_operand(x)
    n = op.array.shape[0]
    s, blk = _per_block(scale, n, block, "scale", np.float32, op.backend)
    arr, given = _output(out, np.int32, n, op)
    if arr is None:
        arr = op.backend.empty(n, np.int32) if hasattr(op.backend, "empty") else np.empty(n, np.int32)
    clipped = op.backend.quantize(op.array, s, blk, rounding == "random", int(seed), int(rank),
                                  int(step), int(offset), lo, hi, arr, **_tag(op))
    return QuantizeResult(given if given is not None else _wrap(arr, op), int(clipped))


def _tag(op: _Operand) -> dict:
    return {"tag": op.tag} if op.backend.__name__.endswith("_cupy") else {}


def dequantize(sums, divisor, *, block: int | None = None, out=None):
    """Integers back to floats: fl32(float64(sums) / float64(divisor)).

    Args:
        sums: 1-D int32 array or tensor (the switch's sum, or one worker's Q_i).
        divisor: a float (n * alpha for IntSGD), or one per block of `block` elements.
        block: elements per divisor when `divisor` is an array.
        out: optional float32 output of the same length (e.g. the gradient, written in place).

    Returns:
        The float32 values, of the kind that came in (`out` itself if given).
    """
    op = _int_operand(sums)
    n = op.array.shape[0]
    d, blk = _per_block(divisor, n, block, "divisor", np.float64, op.backend)
    _check_divisor(d)
    arr, given = _output(out, np.float32, n, op)
    if arr is None:
        arr = op.backend.empty(n, np.float32) if hasattr(op.backend, "empty") else np.empty(n, np.float32)
    op.backend.dequantize(op.array, d, blk, arr, False)
    return given if given is not None else _wrap(arr, op)


def dequantize_add(ints, divisor, acc, *, block: int | None = None):
    """Add decoded integers into a float32 array in place: acc = fl32(acc + fl32(ints / divisor)).

    IntDIANA's shift updates are two calls: h_i += Q_i / alpha is
    `dequantize_add(q_i, alpha, h_i)` and h += S / (n alpha) is `dequantize_add(s, n * alpha, h)`.

    Args:
        ints: 1-D int32 array or tensor.
        divisor: a float, or one per block of `block` elements.
        acc: float32 array or tensor of the same length and device, updated in place.

    Returns:
        acc.
    """
    op = _int_operand(ints, name="ints")
    n = op.array.shape[0]
    d, blk = _per_block(divisor, n, block, "divisor", np.float64, op.backend)
    _check_divisor(d)
    arr, given = _output(acc, np.float32, n, op, name="acc")
    op.backend.dequantize(op.array, d, blk, arr, True)
    return given


def _check_divisor(d) -> None:
    """A zero or non-finite divisor would silently turn the sum into inf/NaN/0: refuse it."""
    if np.ndim(d) == 0:
        if d == 0:
            raise ValueError("divisor must be nonzero")
        return
    host = d if isinstance(d, np.ndarray) else d.get()  # per-block divisors: n / k values, small
    if not bool(np.isfinite(host).all()) or bool((host == 0).any()):
        raise ValueError("every per-block divisor must be finite and nonzero")


def block_max_abs(x, block: int):
    """max |x| per consecutive block of `block` elements (the last block may be short).

    Returns:
        float32 array (kind of x), one per block; NaN propagates.
    """
    op = _float_operand(x)
    blk = _check_block(block)
    return _wrap(op.backend.block_max_abs(op.array, blk, **_tag(op)), op)


def block_exponents(x, block: int):
    """Per-block exponent e with 2^(e-1) <= max|x| < 2^e (frexp), SwitchML's packet exponent.

    Returns:
        int8 array (kind of x), one per block: -128 for an all-zero block, else clamped to [-127, 127].

    Raises:
        ValueError: a block holds inf or NaN (no exponent can scale it; fix the gradient first).
    """
    op = _float_operand(x)
    blk = _check_block(block)
    m = op.backend.block_max_abs(op.array, blk, **_tag(op))
    host_m = m if isinstance(m, np.ndarray) else m.get()
    bad = np.flatnonzero(~np.isfinite(host_m))
    if bad.size:
        raise ValueError(f"block {int(bad[0])} (of {host_m.size}) holds inf or NaN: "
                         f"no exponent can scale it; check the gradient for overflow")
    if isinstance(m, np.ndarray):
        from switchagg.kernels._numpy import exponents_from_max
        return _wrap(exponents_from_max(m), op)
    return _wrap(op.backend.exponents_from_max(m), op)


def int_squared_norm(sums) -> int:
    """Exact sum of squares of an int32 array (no overflow, no float), as a Python int."""
    op = _int_operand(sums)
    return int(op.backend.int_squared_norm(op.array))
