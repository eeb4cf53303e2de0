// cuda_host_harness.cpp: runs the __host__ __device__ functions of quantize_math.cuh on the CPU.
//
// tests/test_cuda_sources.py compiles this file (with nvcc -x cu, or g++ and the header's shim) and
// compares what it prints with the numpy reference, bit for bit. It reads raw little-endian arrays
// from an input file and writes raw arrays to an output file; no parsing beyond argv.
//
// usage: harness MODE N IN OUT [params]
//   philox   in: N x (c0 c1 c2 c3 k0 k1) u32                  out: N x 4 u32
//   random   in: N f32 x, N f32 s, N u64 g   params: seed rank step lo hi
//                                                             out: N i32 value, N i32 clipped
//   nearest  in: N f32 x, N f32 s             params: lo hi   out: N i32 value, N i32 clipped
//   dequant  in: N i32 v, N f64 d, N f32 acc                  out: N f32 v/d, N f32 acc + v/d
//   exponent in: N u32 max |x| bits                           out: N i32
//   half     in: N u16                                        out: N f32
//   bf16     in: N u16                                        out: N f32
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "quantize_math.cuh"

static std::vector<char> read_all(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(2); }
  std::vector<char> buf;
  char chunk[1 << 16];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof chunk, f)) > 0) buf.insert(buf.end(), chunk, chunk + got);
  std::fclose(f);
  return buf;
}

template <class T>
static const T* take(const std::vector<char>& buf, size_t& pos, size_t n) {
  if (pos + n * sizeof(T) > buf.size()) { std::fprintf(stderr, "input too short\n"); std::exit(2); }
  const T* p = reinterpret_cast<const T*>(buf.data() + pos);
  pos += n * sizeof(T);
  return p;
}

int main(int argc, char** argv) {
  if (argc < 5) { std::fprintf(stderr, "usage: %s MODE N IN OUT [params]\n", argv[0]); return 2; }
  const char* mode = argv[1];
  const size_t n = std::strtoull(argv[2], nullptr, 10);
  const std::vector<char> in = read_all(argv[3]);
  std::vector<char> out;
  size_t pos = 0;
  auto put = [&out](const void* p, size_t bytes) {
    out.insert(out.end(), (const char*)p, (const char*)p + bytes);
  };
  if (!std::strcmp(mode, "philox")) {
    const sa_u32* w = take<sa_u32>(in, pos, 6 * n);
    for (size_t i = 0; i < n; ++i) {
      sa_u32 c[4] = {w[6 * i], w[6 * i + 1], w[6 * i + 2], w[6 * i + 3]};
      sa_philox4x32_10(c, w[6 * i + 4], w[6 * i + 5]);
      put(c, sizeof c);
    }
  } else if (!std::strcmp(mode, "random") || !std::strcmp(mode, "nearest")) {
    const bool random = mode[0] == 'r';
    if (argc < (random ? 10 : 7)) { std::fprintf(stderr, "missing params\n"); return 2; }
    const float* x = take<float>(in, pos, n);
    const float* s = take<float>(in, pos, n);
    std::vector<int> values(n), clipped(n);
    if (random) {
      const sa_u64* g = take<sa_u64>(in, pos, n);
      const sa_u64 seed = std::strtoull(argv[5], nullptr, 10);
      const sa_u32 rank = (sa_u32)std::strtoul(argv[6], nullptr, 10);
      const sa_u32 step = (sa_u32)std::strtoul(argv[7], nullptr, 10);
      const int lo = std::atoi(argv[8]), hi = std::atoi(argv[9]);
      for (size_t i = 0; i < n; ++i)
        values[i] = sa_round_random(x[i], s[i], sa_element_bits(seed, rank, step, g[i]), lo, hi,
                                    &clipped[i]);
    } else {
      const int lo = std::atoi(argv[5]), hi = std::atoi(argv[6]);
      for (size_t i = 0; i < n; ++i) values[i] = sa_round_nearest(x[i], s[i], lo, hi, &clipped[i]);
    }
    put(values.data(), n * sizeof(int));
    put(clipped.data(), n * sizeof(int));
  } else if (!std::strcmp(mode, "dequant")) {
    const int* v = take<int>(in, pos, n);
    const double* d = take<double>(in, pos, n);
    const float* acc = take<float>(in, pos, n);
    std::vector<float> q(n), a(n);
    for (size_t i = 0; i < n; ++i) {
      q[i] = sa_dequantize(v[i], d[i]);
      a[i] = sa_dequantize_add(acc[i], v[i], d[i]);
    }
    put(q.data(), n * sizeof(float));
    put(a.data(), n * sizeof(float));
  } else if (!std::strcmp(mode, "exponent")) {
    const sa_u32* m = take<sa_u32>(in, pos, n);
    for (size_t i = 0; i < n; ++i) {
      const int e = sa_exponent_of_abs_bits(m[i]);
      put(&e, sizeof e);
    }
  } else if (!std::strcmp(mode, "half") || !std::strcmp(mode, "bf16")) {
    const unsigned short* h = take<unsigned short>(in, pos, n);
    for (size_t i = 0; i < n; ++i) {
      const float f = mode[0] == 'h' ? sa_half_to_float(h[i]) : sa_bf16_to_float(h[i]);
      put(&f, sizeof f);
    }
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  FILE* f = std::fopen(argv[4], "wb");
  if (!f || std::fwrite(out.data(), 1, out.size(), f) != out.size()) { std::perror(argv[4]); return 2; }
  std::fclose(f);
  return 0;
}
