"""One DDP bucket's way through the switch: check, quantize, one async call, decode in place.

What it owns: the work every switch hook shares (DESIGN.md §3, for one bucket): the finite check,
the bucket's float view, IntSGD's alpha quantization, SwitchML's per-packet exponent stream with
its look-ahead, the bridge from the client's `concurrent.futures.Future` to the torch Future DDP
waits on, and the decode into the bucket's buffer. What it must never do: choose a scale (the
state's scaler and `switchagg.scaling` do), block (the hook thread only launches; decoding runs in
a `.then` callback in the client's engine thread, with no waits), or submit a switch call from a
callback.

Why never from a callback: the switch pairs the ranks' calls by a running chunk counter
(DESIGN.md §5), so every rank must make the same calls in the same order. The hook thread launches
buckets in DDP's index order, identical on every rank; a call launched when some earlier result
arrives would interleave differently on each rank. That is why the heuristic is always ONE stream
call per bucket (s + chunks virtual packets: an exponent-only batch of s packets, then the chunks,
each encoded with the max exponent returned s packets earlier), never `SwitchCollective`'s
two-call form for small vectors. A bucket of fewer than s chunks thus pays s - chunks padding
packets (2 MiB at the default s = 8192, k = 64); DDP's buckets (1 MiB first, 25 MiB after) mostly
exceed s chunks, and a job that minds can ask for fewer slots (`ClientConfig.slots`).

Devices. A CUDA bucket is quantized on its device (the kernels dispatch to cupy) and its int32
values copied to the host for the client; the heuristic's per-packet encode runs in the engine
thread on a host copy. Decoding writes float32 into a CPU float32 bucket directly, else through a
host array and one copy_.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable

import numpy as np
import torch

from switchagg import kernels
from switchagg._methods._base import NonFiniteGradient, non_finite_counts
from switchagg._methods.heuristic import chunked_sq_norm
from switchagg.errors import SwitchError
from switchagg.scaling import block_scales, lookahead_fill, lookahead_numel, lookahead_sums

__all__ = ["check_finite", "completed_future", "launch_heuristic", "launch_intsgd", "open_client"]


def completed_future(value) -> torch.futures.Future:
    """A torch Future already holding value (a tensor) or, if it is an exception, failed with it.

    An exception is passed through a `.then` callback: `Future.set_exception` stores it as the
    value with a Python-side unwrap, which DDP's C++ side would try to cast to a tensor; raising
    it inside a callback marks the chained future failed for C++ too.
    """
    fut: torch.futures.Future = torch.futures.Future()
    if not isinstance(value, BaseException):
        fut.set_result(value)
        return fut
    fut.set_exception(value)
    return fut.then(_reraise)


def _reraise(done: torch.futures.Future):
    return done.value()  # raises the stored exception


def check_finite(state, buf: torch.Tensor, bucket_index: int) -> None:
    """Raise NonFiniteGradient if the bucket holds NaN or Inf, aborting the switch job first.

    The other ranks are waiting for this rank's packets; leaving with a reason makes the switch
    abort the job, so they fail at once with JobAborted naming it instead of timing out.
    """
    counts = non_finite_counts(buf)
    if counts is None:
        return
    nans, infs = counts
    error = NonFiniteGradient(
        f"DDP bucket {bucket_index} ({buf.numel()} elements) holds {nans} NaN and {infs} Inf "
        f"gradient values on rank {state.rank}; nothing was sent and the switch job was aborted. "
        f"Lower the learning rate, clip gradients or use loss scaling.", rank=state.rank,
        field="bucket", value=bucket_index)
    state.close(reason=f"rank {state.rank}: non-finite gradient in DDP bucket {bucket_index}")
    raise error


def _host_f32(buf: torch.Tensor) -> np.ndarray:
    """The bucket as a 1-D float32 numpy array: a view of a CPU float32 bucket, else a copy."""
    flat = buf.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        return flat.numpy()
    return flat.to(device="cpu", dtype=torch.float32).numpy()


def _spans(bucket, blocks: bool, state) -> list[tuple[int | None, int, int]]:
    """(block key, start, stop) per alpha block of the bucket: one span, or one per parameter."""
    numel = bucket.buffer().numel()
    if not blocks:
        return [(None, 0, numel)]
    spans, a = [], 0
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        b = a + grad.numel()
        spans.append((state._block_key(param, grad.numel()), a, b))
        a = b
    if a != numel:
        raise RuntimeError(f"DDP bucket {bucket.index()}: its gradients cover {a} of {numel} "
                           f"elements; cannot place per-parameter scales")
    return spans


def _bridge(state, call: concurrent.futures.Future,
            to_tensor: Callable[[object], torch.Tensor]) -> torch.futures.Future:
    """A torch Future completed from the client's Future (in the engine thread)."""
    fut: torch.futures.Future = torch.futures.Future()

    def forward_result(done: concurrent.futures.Future) -> None:
        error = done.exception()
        if error is not None:
            if state.error is None:
                state.error = error
            fut.set_exception(error)
        else:
            fut.set_result(to_tensor(done.result()))

    call.add_done_callback(forward_result)
    return fut


def _write_back(buf: torch.Tensor, decode: Callable[[np.ndarray | None], np.ndarray]
                ) -> torch.Tensor:
    """Run decode(out) into the bucket: in place for a CPU float32 bucket, else via a copy."""
    if buf.device.type == "cpu" and buf.dtype == torch.float32:
        decode(buf.numpy())
    else:
        out = np.empty(buf.numel(), np.float32)
        decode(out)
        buf.copy_(torch.from_numpy(out).view(buf.shape))
    return buf


def launch_intsgd(state, client, bucket, it, offset: int, blocks: bool) -> torch.futures.Future:
    """Quantize a bucket with alpha (one per span), launch its SUM, decode it when it returns."""
    buf = bucket.buffer()
    n = client.world_size
    lo, hi, _ = state._budget(n)
    spans = _spans(bucket, blocks, state)
    alphas = [float(it.alpha[0 if key is None else key]) for key, _, _ in spans]
    q = np.empty(buf.numel(), np.int32)
    x = buf.detach().reshape(-1) if buf.is_cuda else _host_f32(buf)
    clipped = 0
    # 1. Q = clip(Int(alpha x)) per span, the rounding stream indexed by the element's position in
    #    the iteration (offset), so buckets never share random numbers.
    for (_, a, b), alpha in zip(spans, alphas):
        res = kernels.quantize(x[a:b], alpha, rounding=state.rounding, seed=state.seed,
                               rank=client.rank, step=it.index, offset=offset + a, lo=lo, hi=hi,
                               out=None if buf.is_cuda else q[a:b])
        if buf.is_cuda:
            q[a:b] = res.values.cpu().numpy()
        clipped += res.clipped
    # 2. S = sum of Q over ranks, in the switch.
    summed = _bridge(state, client.allreduce_async(q), torch.from_numpy)

    def decode_into_bucket(done: torch.futures.Future) -> torch.Tensor:
        # 3. g = S / (n alpha) per span, into the bucket; 4. record ||S||^2 exactly for r.
        sums = done.value().numpy()
        norms = {}

        def decode(out: np.ndarray) -> None:
            for (key, a, b), alpha in zip(spans, alphas):
                if b > a:
                    kernels.dequantize(sums[a:b], n * alpha, out=out[a:b])
                norms[key] = kernels.int_squared_norm(sums[a:b]) if b > a else 0

        result = _write_back(buf, decode)
        if blocks:
            it.record(blocks=norms, clipped=clipped)
        else:
            it.record(int_sq=norms[None], clipped=clipped)
        return result

    return summed.then(decode_into_bucket)


def launch_heuristic(state, client, bucket, it, position: int, observe: bool,
                     blocks: bool = False) -> torch.futures.Future:
    """Reduce a bucket with SwitchML's per-packet exponents in one look-ahead stream call.

    Args:
        observe: record the step's squared length for IntSGD's first step (by launch position,
            or per parameter block when blocks).
    """
    buf = bucket.buffer()
    n, k, s = client.world_size, client.k, client.slots
    lo, hi, magnitude = state._budget(n)
    spans = _spans(bucket, blocks, state) if observe else []
    x = _host_f32(buf)
    d = x.size
    if d == 0:
        if observe:
            it.record(position=position, value=0.0)
        return completed_future(buf)
    # 1. Each chunk's local exponent e = floor(log2 max|v|) + 1.
    exponents = kernels.block_exponents(x, k)
    chunks = exponents.size
    q = np.zeros(chunks * k, np.int32)
    scales = np.ones(chunks, np.float32)
    clipped = [0]

    def encode(c0: int, c1: int, max_exponents: np.ndarray) -> np.ndarray:
        # Runs in the engine thread just before chunks [c0, c1) leave, each scaled by the max
        # exponent the switch returned with the exponent-only packet of that chunk (3.).
        f = block_scales(max_exponents, n, magnitude)
        a, b = c0 * k, min(c1 * k, d)
        res = kernels.quantize(x[a:b], f, rounding="deterministic", block=k, lo=lo, hi=hi,
                               out=q[a:b])
        scales[c0:c1] = f
        clipped[0] += int(res.clipped)
        return q[c0 * k:c1 * k]

    # 2.-3. One stream call: the exponent-only batch, then the payload (see the module essay).
    call = client.allreduce_stream_async(lookahead_numel(chunks, s, k),
                                         lookahead_fill(exponents, s, k, encode))
    summed = _bridge(state, call,
                     lambda result: torch.from_numpy(lookahead_sums(result[0], s, k, d)))

    def decode_into_bucket(done: torch.futures.Future) -> torch.Tensor:
        # 4. g_c = S_c / (n f_c) per chunk, into the bucket (and the step length, if asked).
        sums = done.value().numpy()
        divisors = n * scales.astype(np.float64)
        result = _write_back(buf, lambda out: kernels.dequantize(sums, divisors, block=k, out=out))
        if observe and blocks:
            it.record(blocks={key: chunked_sq_norm(sums, divisors, k, a, b)
                              for key, a, b in spans}, clipped=clipped[0])
        elif observe:
            it.record(position=position, value=chunked_sq_norm(sums, divisors, k),
                      clipped=clipped[0])
        else:
            it.record(clipped=clipped[0])
        return result

    return summed.then(decode_into_bucket)


def open_client(state):
    """The state's client, or the SwitchError that opening it raised."""
    try:
        return state.client
    except SwitchError as exc:
        return exc
