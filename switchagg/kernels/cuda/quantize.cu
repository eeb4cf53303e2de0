// quantize.cu: the GPU quantization kernels, loaded by switchagg/kernels/_cupy.py (cupy.RawModule).
//
// What it owns: indexing and reductions around the per-element math of quantize_math.cuh, which
// fixes every bit (and is tested on the host against numpy). Kernels are extern "C" so cupy finds
// them by name; each input type (float32, float16, bfloat16 as raw 16-bit words) gets its own entry.
//
// What it must never do: compute a value differently from the header, or depend on the launch
// shape: every kernel is a grid-stride loop, so any grid gives the same output.
//
// Kernels:
//   sa_quantize_random_{f32,f16,bf16}   one thread per Philox group of four elements (one generator
//                                       call, four outputs); clipped counts: one atomicAdd per thread
//                                       that clipped anything (rare by design)
//   sa_quantize_nearest_{f32,f16,bf16}  one thread per element
//   sa_dequantize                       out = fl32(v / d), or out += that (IntDIANA shift updates)
//   sa_block_max_abs_bits_{f32,f16,bf16}  one warp per block of `block` elements: max of |x| bits
//   sa_exponents                        frexp exponent of each block max
//   sa_int_squared_norm                 exact sum of squares as (high, low) uint64 parts split at bit 31
//
// Per-block scales: the scale of element j is scales[j >> block_shift] when block is a power of
// two (block_shift >= 0), else scales[j / block]; per_block = 0 means one scale for all.
#include "quantize_math.cuh"

struct SaF32 {
  typedef float T;
  static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
};
struct SaF16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(const unsigned short* p, long long i) {
    return sa_half_to_float(p[i]);
  }
};
struct SaBF16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(const unsigned short* p, long long i) {
    return sa_bf16_to_float(p[i]);
  }
};

__device__ __forceinline__ long long sa_block_of(long long j, long long block, int block_shift) {
  return block_shift >= 0 ? (j >> block_shift) : j / block;
}

template <class L>
__device__ __forceinline__ void sa_quantize_random(const typename L::T* __restrict__ x,
                                                   const float* __restrict__ scales, long long n,
                                                   long long block, int block_shift, int per_block,
                                                   sa_u64 seed, sa_u32 rank, sa_u32 step,
                                                   sa_u64 offset, int lo, int hi,
                                                   int* __restrict__ out, sa_u64* clipped) {
  const sa_u64 q_first = offset >> 2;
  const sa_u64 ngroups = ((offset + (sa_u64)n - 1) >> 2) - q_first + 1;
  sa_u64 local = 0;
  for (sa_u64 gi = (sa_u64)blockIdx.x * blockDim.x + threadIdx.x; gi < ngroups;
       gi += (sa_u64)gridDim.x * blockDim.x) {
    sa_u32 w[4];
    sa_philox_group(seed, rank, step, q_first + gi, w);
    const long long j0 = (long long)(((q_first + gi) << 2) - offset);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const long long j = j0 + k;
      if (j >= 0 && j < n) {
        const float s = scales[per_block ? sa_block_of(j, block, block_shift) : 0];
        int c;
        out[j] = sa_round_random(L::load(x, j), s, w[k], lo, hi, &c);
        local += c;
      }
    }
  }
  if (local) atomicAdd(clipped, local);
}

template <class L>
__device__ __forceinline__ void sa_quantize_nearest(const typename L::T* __restrict__ x,
                                                    const float* __restrict__ scales, long long n,
                                                    long long block, int block_shift, int per_block,
                                                    int lo, int hi, int* __restrict__ out,
                                                    sa_u64* clipped) {
  sa_u64 local = 0;
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n;
       j += (long long)gridDim.x * blockDim.x) {
    const float s = scales[per_block ? sa_block_of(j, block, block_shift) : 0];
    int c;
    out[j] = sa_round_nearest(L::load(x, j), s, lo, hi, &c);
    local += c;
  }
  if (local) atomicAdd(clipped, local);
}

template <class L>
__device__ __forceinline__ void sa_block_max_abs_bits(const typename L::T* __restrict__ x,
                                                      long long n, long long block,
                                                      long long nblocks, sa_u32* __restrict__ out) {
  const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (long long b = warp; b < nblocks; b += nwarps) {  // uniform per warp: shuffles are safe
    const long long start = b * block;
    const long long end = start + block < n ? start + block : n;
    sa_u32 m = 0;
    for (long long j = start + lane; j < end; j += 32) {
      const sa_u32 v = sa_abs_bits(L::load(x, j));
      m = v > m ? v : m;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const sa_u32 o = __shfl_xor_sync(0xFFFFFFFFu, m, off);
      m = o > m ? o : m;
    }
    if (lane == 0) out[b] = m;
  }
}

#define SA_INSTANTIATE(SUFFIX, LOADER)                                                           \
  extern "C" __global__ void sa_quantize_random_##SUFFIX(                                        \
      const LOADER::T* x, const float* scales, long long n, long long block, int block_shift,    \
      int per_block, sa_u64 seed, sa_u32 rank, sa_u32 step, sa_u64 offset, int lo, int hi,       \
      int* out, sa_u64* clipped) {                                                               \
    sa_quantize_random<LOADER>(x, scales, n, block, block_shift, per_block, seed, rank, step,    \
                               offset, lo, hi, out, clipped);                                    \
  }                                                                                              \
  extern "C" __global__ void sa_quantize_nearest_##SUFFIX(                                       \
      const LOADER::T* x, const float* scales, long long n, long long block, int block_shift,    \
      int per_block, int lo, int hi, int* out, sa_u64* clipped) {                                \
    sa_quantize_nearest<LOADER>(x, scales, n, block, block_shift, per_block, lo, hi, out,        \
                                clipped);                                                        \
  }                                                                                              \
  extern "C" __global__ void sa_block_max_abs_bits_##SUFFIX(                                     \
      const LOADER::T* x, long long n, long long block, long long nblocks, sa_u32* out) {        \
    sa_block_max_abs_bits<LOADER>(x, n, block, nblocks, out);                                    \
  }

SA_INSTANTIATE(f32, SaF32)
SA_INSTANTIATE(f16, SaF16)
SA_INSTANTIATE(bf16, SaBF16)

extern "C" __global__ void sa_dequantize(const int* __restrict__ v, const double* __restrict__ divisors,
                                         long long n, long long block, int block_shift, int per_block,
                                         float* __restrict__ out, int accumulate) {
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n;
       j += (long long)gridDim.x * blockDim.x) {
    const double d = divisors[per_block ? sa_block_of(j, block, block_shift) : 0];
    out[j] = accumulate ? sa_dequantize_add(out[j], v[j], d) : sa_dequantize(v[j], d);
  }
}

extern "C" __global__ void sa_exponents(const sa_u32* __restrict__ max_bits, long long nblocks,
                                        signed char* __restrict__ out) {
  for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks;
       b += (long long)gridDim.x * blockDim.x) {
    out[b] = (signed char)sa_exponent_of_abs_bits(max_bits[b]);
  }
}

// parts[0] += sum of (v^2 >> 31), parts[1] += sum of (v^2 & (2^31 - 1)); exact while n < 2^33.
extern "C" __global__ void sa_int_squared_norm(const int* __restrict__ v, long long n,
                                               sa_u64* parts) {
  sa_u64 hi = 0, lo = 0;
  for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n;
       j += (long long)gridDim.x * blockDim.x) {
    const sa_u64 sq = (sa_u64)((long long)v[j] * (long long)v[j]);  // <= 2^62
    hi += sq >> 31;
    lo += sq & 0x7FFFFFFFull;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    hi += __shfl_down_sync(0xFFFFFFFFu, hi, off);
    lo += __shfl_down_sync(0xFFFFFFFFu, lo, off);
  }
  if ((threadIdx.x & 31) == 0 && (hi | lo)) {
    atomicAdd(&parts[0], hi);
    atomicAdd(&parts[1], lo);
  }
}
