// quantize_math.cuh: the per-element arithmetic of every quantization kernel, for device and host.
//
// What it owns: the exact bits. Each function here is the CUDA twin of one rule in
// switchagg/kernels/_numpy.py (the oracle): Philox4x32-10 and the element keying rule (_philox.py),
// the uniform from 32 bits, randomized and deterministic rounding with clipping, the inverse, the
// block exponent, and float16/bfloat16 widening. The kernels in quantize.cu only add indexing.
//
// What it must never do: include anything (NVRTC, which cupy uses, has no standard headers), or let
// the compiler change a result: float products and sums go through __fmul_rn/__fadd_rn on the
// device (never contracted into an FMA), and the float64 steps are exact by construction (see
// sa_round_random). Compiled for the host, it is the same code, so tests/cuda_host_harness.cpp runs
// it on the CPU and compares it bit for bit with numpy.
//
// Host builds: nvcc compiles it as is (host pass); a plain C++ compiler gets the shim below, and
// must be run with -ffp-contract=off (the tests do).
#pragma once

#if !defined(__CUDACC__)  // plain C++ compiler: the host shim
#include <cmath>
#define __host__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
using std::floor;
#endif

typedef unsigned int sa_u32;
typedef unsigned long long sa_u64;

#define SA_PHILOX_M0 0xD2511F53u
#define SA_PHILOX_M1 0xCD9E8D57u
#define SA_PHILOX_W0 0x9E3779B9u
#define SA_PHILOX_W1 0xBB67AE85u
#define SA_TWO_M32 2.3283064365386962890625e-10  // 2^-32, exact

// ---- float operations with a fixed rounding (no contraction) ----------------------------------

__host__ __device__ __forceinline__ float sa_fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ __forceinline__ float sa_fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

__host__ __device__ __forceinline__ double sa_dsub(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

__host__ __device__ __forceinline__ float sa_ddiv_to_float(double a, double b) {
#ifdef __CUDA_ARCH__
  return __double2float_rn(__ddiv_rn(a, b));
#else
  return (float)(a / b);
#endif
}

__host__ __device__ __forceinline__ sa_u32 sa_float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  sa_u32 b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
#endif
}

__host__ __device__ __forceinline__ float sa_bits_float(sa_u32 b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float x;
  __builtin_memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// ---- Philox4x32-10 (Random123) and the element keying rule ------------------------------------

__host__ __device__ __forceinline__ sa_u32 sa_mulhi(sa_u32 a, sa_u32 b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return (sa_u32)(((sa_u64)a * b) >> 32);
#endif
}

// Ten rounds over counter c (in place) under key (k0, k1); the key is bumped between rounds.
__host__ __device__ __forceinline__ void sa_philox4x32_10(sa_u32 c[4], sa_u32 k0, sa_u32 k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += SA_PHILOX_W0;
      k1 += SA_PHILOX_W1;
    }
    const sa_u32 hi0 = sa_mulhi(SA_PHILOX_M0, c[0]), lo0 = SA_PHILOX_M0 * c[0];
    const sa_u32 hi1 = sa_mulhi(SA_PHILOX_M1, c[2]), lo1 = SA_PHILOX_M1 * c[2];
    const sa_u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// The four words of group q = g div 4: element g uses word g mod 4 (see _philox.py).
__host__ __device__ __forceinline__ void sa_philox_group(sa_u64 seed, sa_u32 rank, sa_u32 step,
                                                         sa_u64 q, sa_u32 words[4]) {
  words[0] = (sa_u32)q;
  words[1] = (sa_u32)(q >> 32);
  words[2] = step;
  words[3] = rank;
  sa_philox4x32_10(words, (sa_u32)seed, (sa_u32)(seed >> 32));
}

__host__ __device__ __forceinline__ sa_u32 sa_element_bits(sa_u64 seed, sa_u32 rank, sa_u32 step,
                                                           sa_u64 g) {
  sa_u32 w[4];
  sa_philox_group(seed, rank, step, g >> 2, w);
  return w[g & 3];
}

// u = bits / 2^32 in [0, 1): exact in float64.
__host__ __device__ __forceinline__ double sa_uniform(sa_u32 bits) {
  return (double)bits * SA_TWO_M32;
}

// ---- rounding and clipping ---------------------------------------------------------------------

// r (an integer or +-inf or NaN, as float64) clipped to [lo, hi]; NaN -> clip(0). Sets *clipped.
__host__ __device__ __forceinline__ int sa_clip(double r, int lo, int hi, int* clipped) {
  if (r != r) {
    *clipped = 1;
    return 0 < lo ? lo : (0 > hi ? hi : 0);
  }
  if (r < (double)lo) {
    *clipped = 1;
    return lo;
  }
  if (r > (double)hi) {
    *clipped = 1;
    return hi;
  }
  *clipped = 0;
  return (int)r;
}

// floor(t) + [bits / 2^32 < t - floor(t)], t = fl32(x * s), clipped. t, floor(t) and t - floor(t)
// are exact in float64 (t has 24 significant bits), so the result depends on no rounding mode.
__host__ __device__ __forceinline__ int sa_round_random(float x, float s, sa_u32 bits, int lo,
                                                        int hi, int* clipped) {
  const double t = (double)sa_fmul(x, s);
  double f = floor(t);
  if (sa_uniform(bits) < sa_dsub(t, f)) f += 1.0;  // inf - inf is NaN: never rounds up
  return sa_clip(f, lo, hi, clipped);
}

// Round half to even of t = fl32(x * s), clipped.
__host__ __device__ __forceinline__ int sa_round_nearest(float x, float s, int lo, int hi,
                                                         int* clipped) {
  return sa_clip((double)rintf(sa_fmul(x, s)), lo, hi, clipped);  // rintf: ties to even
}

// ---- the inverse ------------------------------------------------------------------------------

__host__ __device__ __forceinline__ float sa_dequantize(int v, double divisor) {
  return sa_ddiv_to_float((double)v, divisor);
}

// IntDIANA shift update: acc + fl32(v / divisor), one float32 add.
__host__ __device__ __forceinline__ float sa_dequantize_add(float acc, int v, double divisor) {
  return sa_fadd(acc, sa_dequantize(v, divisor));
}

// ---- block maxima and exponents ----------------------------------------------------------------

// |x| as bits: for non-negative floats the bit order is the value order, and NaN sorts above inf,
// so an integer max over these is max |x| with NaN propagating (fmaxf would drop NaN).
__host__ __device__ __forceinline__ sa_u32 sa_abs_bits(float x) {
  return sa_float_bits(x) & 0x7FFFFFFFu;
}

// frexp exponent e of m = bits (finite, >= 0): 2^(e-1) <= m < 2^e; -128 for 0; clamped to +-127.
__host__ __device__ __forceinline__ int sa_exponent_of_abs_bits(sa_u32 m) {
  if (m == 0) return -128;
  const int field = (int)(m >> 23);
  int e = field > 0 ? field - 126 : (m >= (1u << 22) ? -126 : -127);  // subnormal: below 2^-126
  return e > 127 ? 127 : (e < -127 ? -127 : e);
}

// ---- narrow floats, widened exactly --------------------------------------------------------------

__host__ __device__ __forceinline__ float sa_bf16_to_float(unsigned short h) {
  return sa_bits_float((sa_u32)h << 16);
}

__host__ __device__ __forceinline__ float sa_half_to_float(unsigned short h) {
  const sa_u32 sign = (sa_u32)(h & 0x8000u) << 16;
  const sa_u32 e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {  // zero or subnormal: m 2^-24, exact in float32
    const float v = sa_fmul((float)m, 5.9604644775390625e-08f);
    return sa_bits_float(sa_float_bits(v) | sign);
  }
  if (e == 31) return sa_bits_float(sign | 0x7F800000u | (m << 13));  // inf, NaN
  return sa_bits_float(sign | ((e + 112u) << 23) | (m << 13));
}
