"""The CUDA backend: cupy RawModule kernels from `cuda/quantize.cu`, loaded on first use.

What it owns: launching the kernels of `cuda/quantize.cu` on cupy arrays (torch CUDA tensors arrive
through DLPack, without a copy), and the zero-copy path to the network: `pinned_empty` gives page-
locked host memory that the quantize kernel writes int32 results into directly (mapped memory), so
no device-to-host copy and no staging step sits between the kernel and ZeroMQ.

What it must never do: import cupy at module import (CPU-only workers never load it), copy floats
to the host, or compute anything itself: the arithmetic is in `cuda/quantize_math.cuh`, which
tests/test_cuda_sources.py checks on the host bit for bit against numpy.

How it works: the `.cu` source, with its header pasted in (so cupy's compile cache, keyed by the
source text, sees header edits), is compiled once per process by NVRTC with `--fmad=false`.
Kernels are grid-stride loops launched on the current cupy stream; the clipped count is the one
value read back (which synchronizes that stream, so a pinned `out` is complete on return).
Overlap of quantizing chunk c + 1 with sending chunk c: keep two pinned buffers and call
`quantize(..., out=buffer[(c + 1) % 2])` from a helper thread while the sending thread hands
buffer[c % 2] to ZeroMQ; both the stream synchronization and the send release the GIL.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = ["check_available", "as_cupy", "empty", "per_block_array", "pinned_empty",
           "is_host_staging", "quantize", "dequantize", "block_max_abs", "exponents_from_max",
           "int_squared_norm"]

_CUDA_DIR = Path(__file__).resolve().parent / "cuda"
_THREADS = 256
_BLOCKS_PER_SM = 32         # enough resident warps to saturate memory bandwidth
_SQNORM_CHUNK = 1 << 31     # elements per exact (hi, lo) uint64 accumulation: see the kernel


def _unavailable(message: str):
    from switchagg.kernels import DeviceUnavailable
    return DeviceUnavailable(message, field="device", value="cuda")


@functools.cache
def _probe() -> str | None:
    """None when a CUDA device is usable, else what is missing (cached: it does not change)."""
    try:
        import cupy
    except ImportError as exc:
        return (f"cupy is not installed ({exc}); install the GPU extra: "
                "pip install 'switchagg[gpu]' (cupy-cuda12x), or use --device cpu")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
        return f"cupy found no usable CUDA driver/runtime ({exc}); use --device cpu"
    if count == 0:
        return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver); use --device cpu"
    return None


def check_available() -> None:
    """Raise DeviceUnavailable naming what is missing (cupy, driver, device), else return."""
    missing = _probe()
    if missing is not None:
        raise _unavailable(f"CUDA kernels requested but {missing}")


@functools.cache
def _module():
    import cupy
    header = (_CUDA_DIR / "quantize_math.cuh").read_text()
    source = (_CUDA_DIR / "quantize.cu").read_text().replace('#include "quantize_math.cuh"', header)
    return cupy.RawModule(code=source, options=("--std=c++17", "--fmad=false"))


def _kernel(name: str):
    return _module().get_function(name)


def _grid(work: int) -> tuple[int]:
    import cupy
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    return (max(1, min(-(-work // _THREADS), sms * _BLOCKS_PER_SM)),)


def as_cupy(x):
    """A cupy view of a torch CUDA tensor (DLPack, no copy); cupy arrays pass through."""
    import cupy
    if isinstance(x, cupy.ndarray):
        return x
    return cupy.from_dlpack(x)


def empty(n: int, dtype):
    import cupy
    return cupy.empty(n, dtype=dtype)


def per_block_array(values):
    import cupy
    return cupy.asarray(values)


def pinned_empty(n: int, dtype=np.int32) -> np.ndarray:
    """Page-locked host memory that kernels can write directly (pass it as `out=`)."""
    import cupyx
    return cupyx.empty_pinned(n, dtype=dtype)


def is_host_staging(arr: np.ndarray) -> bool:
    """Whether a numpy array lives in page-locked (CUDA host) memory."""
    import cupy
    try:
        attrs = cupy.cuda.runtime.pointerGetAttributes(arr.ctypes.data)
    except Exception:
        return False
    return attrs.type == cupy.cuda.runtime.memoryTypeHost


def _device_view(arr):
    """The kernel-side array for `out`: cupy as is; pinned numpy through its mapped device pointer.

    Under unified addressing (every 64-bit CUDA platform) page-locked memory from cudaHostAlloc is
    mapped into the device's address space; the driver reports the device-side address.
    """
    import cupy
    if isinstance(arr, cupy.ndarray):
        return arr
    dptr = cupy.cuda.runtime.pointerGetAttributes(arr.ctypes.data).devicePointer
    mem = cupy.cuda.UnownedMemory(dptr, arr.nbytes, owner=arr)
    return cupy.ndarray(arr.shape, arr.dtype, cupy.cuda.MemoryPointer(mem, 0))


def _block_args(scalar_or_array, block: int, dtype):
    """(array, block, block_shift, per_block) as the kernels take them."""
    import cupy
    if np.ndim(scalar_or_array) == 0:
        return cupy.full(1, scalar_or_array, dtype=dtype), np.int64(1), np.int32(0), np.int32(0)
    shift = block.bit_length() - 1 if block & (block - 1) == 0 else -1
    return (cupy.ascontiguousarray(scalar_or_array, dtype=dtype), np.int64(block), np.int32(shift),
            np.int32(1))


def quantize(x, scale, block: int, random: bool, seed: int, rank: int, step: int, offset: int,
             lo: int, hi: int, out, *, tag: str) -> int:
    """Same contract as `_numpy.quantize`; `tag` names x's element type (f32, f16, bf16)."""
    import cupy
    n = x.shape[0]
    if n == 0:
        return 0
    scales, blk, shift, per_block = _block_args(scale, block, np.float32)
    clipped = cupy.zeros(1, dtype=np.uint64)
    dst = _device_view(out)
    if random:
        groups = (offset + n - 1) // 4 - offset // 4 + 1
        _kernel(f"sa_quantize_random_{tag}")(
            _grid(groups), (_THREADS,),
            (x, scales, np.int64(n), blk, shift, per_block, np.uint64(seed), np.uint32(rank),
             np.uint32(step), np.uint64(offset), np.int32(lo), np.int32(hi), dst, clipped))
    else:
        _kernel(f"sa_quantize_nearest_{tag}")(
            _grid(n), (_THREADS,),
            (x, scales, np.int64(n), blk, shift, per_block, np.int32(lo), np.int32(hi), dst, clipped))
    return int(clipped.get()[0])  # synchronizes: a pinned `out` is complete on return


def dequantize(ints, divisor, block: int, out, accumulate: bool) -> None:
    """Same contract as `_numpy.dequantize` (float32 `out`, on the device)."""
    n = ints.shape[0]
    if n:
        divisors, blk, shift, per_block = _block_args(divisor, block, np.float64)
        _kernel("sa_dequantize")(_grid(n), (_THREADS,),
                                 (ints, divisors, np.int64(n), blk, shift, per_block, out,
                                  np.int32(bool(accumulate))))


def block_max_abs(x, block: int, *, tag: str):
    """Same contract as `_numpy.block_max_abs`: float32 cupy array, one per block."""
    import cupy
    n = x.shape[0]
    nblocks = -(-n // block)
    out = cupy.zeros(nblocks, dtype=np.uint32)
    if n:  # one warp per block: 32 threads of work each
        _kernel(f"sa_block_max_abs_bits_{tag}")(
            _grid(nblocks * 32), (_THREADS,),
            (x, np.int64(n), np.int64(block), np.int64(nblocks), out))
    return out.view(np.float32)


def exponents_from_max(m):
    """Same contract as `_numpy.exponents_from_max`, on the device."""
    import cupy
    out = cupy.empty(m.shape[0], dtype=np.int8)
    if m.shape[0]:
        _kernel("sa_exponents")(_grid(m.shape[0]), (_THREADS,),
                                (m.view(np.uint32), np.int64(m.shape[0]), out))
    return out


def int_squared_norm(ints) -> int:
    """Same contract as `_numpy.int_squared_norm`."""
    import cupy
    total = 0
    for start in range(0, ints.shape[0], _SQNORM_CHUNK):
        part = ints[start:start + _SQNORM_CHUNK]
        parts = cupy.zeros(2, dtype=np.uint64)
        _kernel("sa_int_squared_norm")(_grid(part.shape[0]), (_THREADS,),
                                       (part, np.int64(part.shape[0]), parts))
        hi, lo = (int(v) for v in parts.get())
        total += (hi << 31) + lo
    return total

