// picochat_cpu::int4_mm and picochat_cpu::int8_mm — weight-only quantized matmuls for x86 CPUs with
// AVX-512 VNNI, built and loaded by cpu_vnni.py. Both return y[M, N] (fp32) = x[M, K] @ W^T.
// picochat_cpu::int4_dequantize gives the int4 weight in bf16, for prefill chunks. (The attention
// ops are in cpu_attention.cpp, built into the same library.)
//
// Like llama.cpp's q4_1 x q8_1 and q8_0 x q8_0 dot products, x is rounded to int8 per group of 32
// (symmetric, one fp32 scale a per group) and each group's dot product is an exact integer sum
// (vpdpbusd: 4 u8 x s8 products a lane, one lane per output row).
//
//   int4: W[n, k] = q[n, k] * d[n, g] + m[n, g]   (q in 0..15; d, m fp16; GGUF Q4_1's rule)
//         y[r, n] = sum_g d[n, g] * a[r, g] * (q . xq)_g + m[n, g] * xsum[r, g]   (xsum: of x itself)
//   int8: W[n, k] = w[n, k] * s[n]                 (w int8, s fp32 per row)
//         y[r, n] = s[n] * sum_g a[r, g] * (w . xq)_g, with w held as u8 = w + 128, so
//         (w . xq)_g = (u8 . xq)_g - 128 * sum(xq)_g
//
// Weight layouts (cpu_vnni.pack_int4 / pack_int8): output rows in blocks of 16, then groups of 32.
//   int4: per (block, group) 4 vectors of 64 bytes; byte 4 * row + b of vector v holds weight
//         8v + b of that row's group in its low nibble and 8v + 4 + b in its high nibble; d and m
//         fp16 [N / 16, G, 16].
//   int8: per (block, group) 8 vectors of 64 bytes; byte 4 * row + b of vector v is weight 4v + b.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using picochat_simd::load16;

constexpr int64_t kRows = 16;    // output rows a block
constexpr int64_t kGroup = 32;   // weights a group
constexpr int TileRows = 8;      // x rows a pass over a block's weights (they stay in L1 across passes)

// x [M, K] rounded to int8 per group of 32, with per (row, group) its scale a, the sum of x and
// the sum of xq (the int8 kernel's correction term, exact in fp32). It lives in buffers of the
// calling thread that only grow: a decode step makes ~120 calls, and four tensors a call were
// ~0.2 ms of allocation a step.
struct QuantizedX {
  int8_t* q;
  float *scale, *sum, *qsum;
};

// The rounding is to nearest, ties to even (the default MXCSR mode), of x * (127 / amax) in fp32.
template <typename T>
void quantize_rows(const T* x, const QuantizedX& out, int64_t M, int64_t K) {
  const int64_t G = K / kGroup;
  for (int64_t r = 0; r < M; r++) {
    for (int64_t g = 0; g < G; g++) {
      const int64_t at = r * K + g * kGroup;
      const __m512 lo = load16(x + at), hi = load16(x + at + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q + at), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q + at + 16), _mm512_cvtsepi32_epi8(qhi));
      out.scale[r * G + g] = amax / 127.f;
      out.sum[r * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
      out.qsum[r * G + g] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
    }
  }
}

QuantizedX quantize(const at::Tensor& x) {
  thread_local std::vector<int8_t> q_buffer;
  thread_local std::vector<float> float_buffer;
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  if (static_cast<int64_t>(q_buffer.size()) < M * K) q_buffer.resize(M * K);
  if (static_cast<int64_t>(float_buffer.size()) < 3 * M * G) float_buffer.resize(3 * M * G);
  float* f = float_buffer.data();
  const QuantizedX out{q_buffer.data(), f, f + M * G, f + 2 * M * G};
  if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(x.contiguous().data_ptr<at::BFloat16>(), out, M, K);
  } else {
    quantize_rows(x.to(at::kFloat).contiguous().data_ptr<float>(), out, M, K);
  }
  return out;
}

// Pointers into a QuantizedX from x row r0 on.
struct XRows {
  const int8_t* q;
  const float *scale, *sum, *qsum;
  XRows(const QuantizedX& x, int64_t r0, int64_t K)
      : q(x.q + r0 * K), scale(x.scale + r0 * K / kGroup), sum(x.sum + r0 * K / kGroup),
        qsum(x.qsum + r0 * K / kGroup) {}
};

// Tile<TILE>::run: one block of 16 output rows against x rows [r0, r0 + TILE); writes
// y[r0 .. r0 + TILE, block * 16 .. + 16).
template <int TILE>
struct Int4Tile {
  static void run(int64_t r0, int64_t block, const QuantizedX* xq, const uint8_t* q, const uint16_t* d,
                  const uint16_t* m, float* y, int64_t N, int64_t K) {
    const int64_t G = K / kGroup;
    const XRows x(*xq, r0, K);
    const uint8_t* qb = q + block * G * 256;
    const uint16_t* db = d + block * G * kRows;
    const uint16_t* mb = m + block * G * kRows;
    const __m512i low_nibble = _mm512_set1_epi8(15);
    __m512 acc[TILE];
    for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
      __m512i w[8];
      for (int v = 0; v < 4; v++) {
        const __m512i bytes = _mm512_loadu_si512(qb + g * 256 + v * 64);
        w[2 * v] = _mm512_and_si512(bytes, low_nibble);
        w[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibble);
      }
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + g * kRows)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mb + g * kRows)));
      for (int r = 0; r < TILE; r++) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(x.q + r * K + g * kGroup);
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int v = 0; v < 4; v++) {
          even = _mm512_dpbusd_epi32(even, w[2 * v], _mm512_set1_epi32(xr[2 * v]));
          odd = _mm512_dpbusd_epi32(odd, w[2 * v + 1], _mm512_set1_epi32(xr[2 * v + 1]));
        }
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dv, _mm512_set1_ps(x.scale[r * G + g])), acc[r]);
        acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.sum[r * G + g]), acc[r]);
      }
    }
    for (int r = 0; r < TILE; r++) _mm512_storeu_ps(y + (r0 + r) * N + block * kRows, acc[r]);
  }
};

template <int TILE>
struct Int8Tile {
  static void run(int64_t r0, int64_t block, const QuantizedX* xq, const uint8_t* w, const float* s, float* y,
                  int64_t N, int64_t K) {
    const int64_t G = K / kGroup;
    const XRows x(*xq, r0, K);
    const uint8_t* wb = w + block * G * 512;
    __m512 acc[TILE];
    for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
    const __m512 offset = _mm512_set1_ps(128.f);
    for (int64_t g = 0; g < G; g++) {
      __m512i wv[8];
      for (int v = 0; v < 8; v++) wv[v] = _mm512_loadu_si512(wb + g * 512 + v * 64);
      for (int r = 0; r < TILE; r++) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(x.q + r * K + g * kGroup);
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int v = 0; v < 8; v += 2) {
          even = _mm512_dpbusd_epi32(even, wv[v], _mm512_set1_epi32(xr[v]));
          odd = _mm512_dpbusd_epi32(odd, wv[v + 1], _mm512_set1_epi32(xr[v + 1]));
        }
        const __m512 dot = _mm512_fnmadd_ps(offset, _mm512_set1_ps(x.qsum[r * G + g]),
                                            _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(x.scale[r * G + g]), acc[r]);
      }
    }
    const __m512 sv = _mm512_loadu_ps(s + block * kRows);
    for (int r = 0; r < TILE; r++) _mm512_storeu_ps(y + (r0 + r) * N + block * kRows, _mm512_mul_ps(acc[r], sv));
  }
};

// Calls Tile<1..8>::run for every (block, tile of up to 8 x rows), blocks split across threads.
template <template <int> class Tile, typename... Args>
void for_each_tile(int64_t blocks, int64_t M, Args... args) {
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      for (int64_t r0 = 0; r0 < M; r0 += TileRows) {
        switch (std::min<int64_t>(TileRows, M - r0)) {
          case 1: Tile<1>::run(r0, b, args...); break;
          case 2: Tile<2>::run(r0, b, args...); break;
          case 3: Tile<3>::run(r0, b, args...); break;
          case 4: Tile<4>::run(r0, b, args...); break;
          case 5: Tile<5>::run(r0, b, args...); break;
          case 6: Tile<6>::run(r0, b, args...); break;
          case 7: Tile<7>::run(r0, b, args...); break;
          default: Tile<8>::run(r0, b, args...); break;
        }
      }
    }
  });
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 3 && d.dim() == 3 && m.dim() == 3, "int4_mm: x [M, K], q/d/m blocked");
  TORCH_CHECK(q.scalar_type() == at::kByte && d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
              "int4_mm: q uint8, d and m float16");
  const int64_t M = x.size(0), K = x.size(1), blocks = q.size(0), G = q.size(1), N = blocks * kRows;
  TORCH_CHECK(K == G * kGroup && q.size(2) == 256 && d.size(0) == blocks && d.size(1) == G &&
              d.size(2) == kRows && m.sizes() == d.sizes(), "int4_mm: shapes do not match");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0) return y;
  const QuantizedX xq = quantize(x);
  const at::Tensor qc = q.contiguous(), dc = d.contiguous(), mc = m.contiguous();
  for_each_tile<Int4Tile>(blocks, M, &xq, qc.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(dc.data_ptr<at::Half>()),
                          reinterpret_cast<const uint16_t*>(mc.data_ptr<at::Half>()), y.data_ptr<float>(), N, K);
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && s.dim() == 1, "int8_mm: x [M, K], w blocked, scales [N]");
  TORCH_CHECK(w.scalar_type() == at::kByte && s.scalar_type() == at::kFloat, "int8_mm: w uint8, scales float32");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), G = w.size(1), N = blocks * kRows;
  TORCH_CHECK(K == G * kGroup && w.size(2) == 512 && s.size(0) == N, "int8_mm: shapes do not match");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0) return y;
  const QuantizedX xq = quantize(x);
  const at::Tensor wc = w.contiguous(), sc = s.contiguous();
  for_each_tile<Int8Tile>(blocks, M, &xq, wc.data_ptr<uint8_t>(), sc.data_ptr<float>(), y.data_ptr<float>(), N, K);
  return y;
}

// The int4 weight as bf16 [N, K] (rounded to nearest even from fp32 q * d + m), for prefill chunks
// that a bf16 matmul serves better than the kernel: one pass, no fp32 copy of the weight.
at::Tensor int4_dequantize(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == 256 && q.scalar_type() == at::kByte && d.scalar_type() == at::kHalf &&
              m.scalar_type() == at::kHalf && d.sizes() == m.sizes(), "int4_dequantize: q/d/m blocked");
  const int64_t blocks = q.size(0), G = q.size(1), N = blocks * kRows, K = G * kGroup;
  at::Tensor out = at::empty({N, K}, q.options().dtype(at::kBFloat16));
  const at::Tensor qc = q.contiguous(), dc = d.contiguous(), mc = m.contiguous();
  const uint8_t* q_p = qc.data_ptr<uint8_t>();
  const at::Half *d_p = dc.data_ptr<at::Half>(), *m_p = mc.data_ptr<at::Half>();
  uint16_t* out_p = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // lanes 4v + b of lo (weight 8v + b) and hi (weight 8v + 4 + b) into weights 0..15 and 16..31
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const auto to_bf16 = [](__m512 v) { return picochat_simd::bf16_halves(picochat_simd::round_bf16(v)); };
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) {
      for (int64_t g = 0; g < G; g++) {
        const uint8_t* qb = q_p + (b * G + g) * 256;
        for (int64_t row = 0; row < kRows; row++) {
          const int32_t* word = reinterpret_cast<const int32_t*>(qb + row * 4);
          const __m512i bytes = _mm512_cvtepu8_epi32(_mm_setr_epi32(word[0], word[16], word[32], word[48]));
          const int64_t at = (b * G + g) * kRows + row;
          const __m512 dv = _mm512_set1_ps(static_cast<float>(d_p[at])), mv = _mm512_set1_ps(static_cast<float>(m_p[at]));
          const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), dv, mv);
          const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), dv, mv);
          uint16_t* dst = out_p + (b * kRows + row) * K + g * kGroup;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bf16(_mm512_permutex2var_ps(lo, first, hi)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), to_bf16(_mm512_permutex2var_ps(lo, second, hi)));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(picochat_cpu, lib) {
  lib.def("int4_mm(Tensor x, Tensor q, Tensor d, Tensor m) -> Tensor");
  lib.def("int8_mm(Tensor x, Tensor w, Tensor s) -> Tensor");
  lib.def("int4_dequantize(Tensor q, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(picochat_cpu, CPU, lib) {
  lib.impl("int4_mm", &int4_mm);
  lib.impl("int8_mm", &int8_mm);
  lib.impl("int4_dequantize", &int4_dequantize);
}
