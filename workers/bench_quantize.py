"""`switchagg bench --quantize`: throughput of the quantization kernels next to copy bandwidth.

What it owns: one measurement, honestly framed. Each kernel's throughput is in GB/s of float32
input (4 bytes per element), printed beside the copy bandwidth of the same device measured in the
same run (memcpy of the same float32 array on CPU, device-to-device copy on GPU), and as a ratio to
it, because a fused kernel reads and writes as many bytes as a copy does: the ratio says how close
to memory speed it runs, whatever the machine. Targets (issue 6): CPU randomized rounding >= 50%
of memcpy, GPU >= 80% of copy bandwidth.

What it must never do: assert a target (it reports), or time the first call (numba compiles, cupy
loads the module; one warm-up call precedes the timed ones). Times are the best of `repeats` calls:
on a shared machine, the least disturbed call is the best estimate of what the kernel can do.

Run: `python -m switchagg.workers.bench_quantize --numel 16777216 --device cpu [--json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

__all__ = ["run_quantize_bench", "main"]


def _best_seconds(fn, repeats: int, sync=None) -> float:
    """Fastest of `repeats` timed calls: on a shared machine, the least disturbed one."""
    fn()  # warm-up: compilation, module load, page faults
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return min(times)


def run_quantize_bench(numel: int = 1 << 24, device: str = "cpu", repeats: int = 7) -> dict:
    """Measure quantize/dequantize throughput and copy bandwidth on one device.

    Args:
        numel: elements per call (float32 input: 4 * numel bytes).
        device: "cpu" (numba, or numpy without numba) or "cuda" (cupy kernels).
        repeats: timed calls per kernel (the fastest is reported).

    Returns:
        A dict: device, backend, numel, repeats, copy_GBps, and for each kernel
        `<name>_GBps` and `<name>_ratio` (throughput / copy bandwidth).

    Raises:
        DeviceUnavailable: device "cuda" without cupy or a GPU (the message names what is missing).
        ValueError: unknown device.
    """
    import switchagg.kernels as K

    rng = np.random.default_rng(0)
    host = rng.normal(size=numel).astype(np.float32)
    if device == "cpu":
        x, dst = host, np.empty_like(host)
        out, back = np.empty(numel, np.int32), np.empty(numel, np.float32)
        backend, sync = K.cpu_backend_name(), None
        copy = lambda: np.copyto(dst, x)  # noqa: E731
        threads = _cpu_threads(backend)
    elif device == "cuda":
        K.require_cuda()
        import cupy
        x, dst = cupy.asarray(host), cupy.empty(numel, np.float32)
        out, back = cupy.empty(numel, np.int32), cupy.empty(numel, np.float32)
        backend, sync = "cupy", cupy.cuda.get_current_stream().synchronize
        copy = lambda: cupy.copyto(dst, x)  # noqa: E731
        threads = None
    else:
        raise ValueError(f"device={device!r}: choose 'cpu' or 'cuda'")

    scales = np.full(-(-numel // 64), 1000.0, np.float32)
    kernels = {
        "quantize_random": lambda: K.quantize(x, 1000.0, seed=1, rank=0, step=1, out=out),
        "quantize_deterministic": lambda: K.quantize(x, 1000.0, rounding="deterministic", out=out),
        "quantize_random_per_block64": lambda: K.quantize(x, scales, block=64, seed=1, out=out),
        "dequantize": lambda: K.dequantize(out, 1000.0, out=back),
        "block_max_abs64": lambda: K.block_max_abs(x, 64),
    }
    nbytes = 4 * numel
    # Copy is timed before and after the kernels and the best kept, so a quiet moment of the machine
    # benefits the denominator as much as the numerators.
    copy_s = _best_seconds(copy, repeats, sync)
    kernel_s = {name: _best_seconds(fn, repeats, sync) for name, fn in kernels.items()}
    copy_s = min(copy_s, _best_seconds(copy, repeats, sync))
    copy_gbps = nbytes / copy_s / 1e9
    result = {"device": device, "backend": backend, "threads": threads, "numel": numel,
              "repeats": repeats, "copy_GBps": round(copy_gbps, 3)}
    for name, seconds in kernel_s.items():
        result[f"{name}_GBps"] = round(nbytes / seconds / 1e9, 3)
        result[f"{name}_ratio"] = round(copy_s / seconds, 3)
    return result


def _cpu_threads(backend: str) -> int | None:
    if backend != "numba":
        return 1
    import numba
    return numba.get_num_threads()


def _print_table(result: dict) -> None:
    print(f"quantize kernels on {result['device']} ({result['backend']}"
          f"{', %d threads' % result['threads'] if result['threads'] else ''}), "
          f"{result['numel']:,} float32 elements, best of {result['repeats']}")
    copy_name = "memcpy" if result["device"] == "cpu" else "device copy"
    print(f"  {copy_name:<30} {result['copy_GBps']:8.2f} GB/s   1.00 x copy")
    for key, value in result.items():
        if key.endswith("_GBps") and key != "copy_GBps":
            name = key[:-5]
            print(f"  {name:<30} {value:8.2f} GB/s   {result[name + '_ratio']:.2f} x copy")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to a parser (used by `main` and by `switchagg bench`)."""
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements per call (default 2^24)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per kernel (the best is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m switchagg.workers.bench_quantize`; returns the exit status."""
    from switchagg.kernels import DeviceUnavailable
    parser = argparse.ArgumentParser(prog="python -m switchagg.workers.bench_quantize", description=__doc__.splitlines()[0])
    configure(parser)
    args = parser.parse_args(argv)
    try:
        result = run_quantize_bench(args.numel, args.device, args.repeats)
    except DeviceUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
