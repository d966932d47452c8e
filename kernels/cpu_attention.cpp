// picochat_cpu::decode_attention and picochat_cpu::prefill_attention — attention for x86 CPUs with
// AVX-512, built into one library with cpu_vnni.cpp by cpu_vnni.py.
//
// decode_attention is kernels/reference.py's decode_attention in one pass, in fp32.
//
// prefill_attention is causal attention of a chunk of queries over its sequence's K/V, bf16 in and
// out, as flash attention does it on a GPU: per (query head, tile of 8 queries) the keys are
// visited in chunks of 64 with an online softmax, scores and output accumulated in fp32, and both
// matmuls run on AVX512-BF16 dot products (vdpbf16ps: a pair of bf16 products a lane), so K and V
// are first laid out per KV head as pairs — K as [key block of 16][dim pair][key], V as
// [key pair][dim] — and the probabilities are rounded to bf16 before p.v (as flash attention
// does). Only key chunks a tile can see are visited: about half the work of the full square.
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

using picochat_simd::exp16;
using picochat_simd::load16;
using picochat_simd::store_row;

constexpr float kMasked = -std::numeric_limits<float>::infinity();  // a position not seen

// One query head of one row: its VECS * 16 dims against the row's S context slots, in fp32 with q
// and the output in registers. A position whose bias is -inf is never read (its slot may be the
// null slot or padding); the others' scores are q.k * scale + bias, then softmax, then p.v.
template <int VECS, typename Q, typename C>
void attend_head(const Q* q, const C* k_pool, const C* v_pool, const int64_t* slots, const float* bias, Q* out,
                 int64_t S, int64_t row_stride, float scale, std::vector<float>& scores) {
  scores.resize(S);
  float* sc = scores.data();
  __m512 qv[VECS];
  for (int j = 0; j < VECS; j++) qv[j] = load16(q + 16 * j);
  float top = kMasked;
  for (int64_t s = 0; s < S; s++) {
    if (bias[s] == kMasked) {
      sc[s] = kMasked;
      continue;
    }
    const C* k = k_pool + slots[s] * row_stride;
    __m512 dot = _mm512_mul_ps(qv[0], load16(k));
    for (int j = 1; j < VECS; j++) dot = _mm512_fmadd_ps(qv[j], load16(k + 16 * j), dot);
    sc[s] = _mm512_reduce_add_ps(dot) * scale + bias[s];
    top = std::max(top, sc[s]);
  }
  __m512 sums = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + s), _mm512_set1_ps(top)));
    _mm512_storeu_ps(sc + s, e);
    sums = _mm512_add_ps(sums, e);
  }
  float total = _mm512_reduce_add_ps(sums);
  for (; s < S; s++) total += (sc[s] = std::exp(sc[s] - top));
  __m512 acc[VECS];
  for (int j = 0; j < VECS; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < S; t++) {
    if (sc[t] == 0.f) continue;  // masked (or too small to count)
    const C* v = v_pool + slots[t] * row_stride;
    const __m512 p = _mm512_set1_ps(sc[t]);
    for (int j = 0; j < VECS; j++) acc[j] = _mm512_fmadd_ps(p, load16(v + 16 * j), acc[j]);
  }
  float result[16 * VECS];
  for (int j = 0; j < VECS; j++) _mm512_storeu_ps(result + 16 * j, _mm512_div_ps(acc[j], _mm512_set1_ps(total)));
  store_row(out, result, 16 * VECS);
}

// attend_head for every (row, query head) of q [B, H, D], one item each; a few short ones run on
// this thread (cheaper than waking the pool).
template <typename Q, typename C>
void attend_all(const Q* q, const C* k_pool, const C* v_pool, const int64_t* slots, const float* bias, Q* out,
                int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, float scale) {
  const int64_t G = H / Hkv;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    for (int64_t i = begin; i < end; i++) {
      const int64_t b = i / H, offset = (i % H / G) * D;
      const Q* qi = q + i * D;
      const C *k = k_pool + offset, *v = v_pool + offset;
      const int64_t* si = slots + b * S;
      const float* bi = bias + b * S;
      switch (D / 16) {
        case 1: attend_head<1>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        case 2: attend_head<2>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        case 3: attend_head<3>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        case 4: attend_head<4>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        case 5: attend_head<5>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        case 6: attend_head<6>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        case 7: attend_head<7>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
        default: attend_head<8>(qi, k, v, si, bi, out + i * D, S, Hkv * D, scale, scores); break;
      }
    }
  });
}

// out [B, H, D] (q's dtype) = softmax(q K^T * scale + bias) V per row and head, K/V read from the
// paged pools [blocks, block_size, Hkv, D] at context_slots [B, S]; bias [B, 1, 1, S] fp32.
// D a multiple of 16 up to 128.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& context_slots, const at::Tensor& bias, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              k_cache.scalar_type() == v_cache.scalar_type() && context_slots.dim() == 2 &&
              context_slots.scalar_type() == at::kLong && bias.scalar_type() == at::kFloat,
              "decode_attention: q [B, H, D], caches [blocks, block, Hkv, D], slots [B, S] int64, bias fp32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(2), S = context_slots.size(1);
  TORCH_CHECK(k_cache.size(3) == D && D % 16 == 0 && D <= 128 && H % Hkv == 0 && context_slots.size(0) == B &&
              bias.numel() == B * S, "decode_attention: shapes do not match");
  const at::Tensor qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  const at::Tensor slots = context_slots.contiguous(), bc = bias.contiguous();
  at::Tensor out = at::empty_like(qc);
  const auto run = [&](auto* q_p, auto* out_p, auto* pool_k, auto* pool_v) {
    attend_all(q_p, pool_k, pool_v, slots.data_ptr<int64_t>(), bc.data_ptr<float>(), out_p, B, q.size(1), Hkv, D, S,
               static_cast<float>(scale));
  };
  const auto with_q = [&](auto* pool_k, auto* pool_v) {
    if (qc.scalar_type() == at::kBFloat16) {
      run(qc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), pool_k, pool_v);
    } else if (qc.scalar_type() == at::kHalf) {
      run(qc.data_ptr<at::Half>(), out.data_ptr<at::Half>(), pool_k, pool_v);
    } else {
      TORCH_CHECK(qc.scalar_type() == at::kFloat, "decode_attention: q float32, bfloat16 or float16");
      run(qc.data_ptr<float>(), out.data_ptr<float>(), pool_k, pool_v);
    }
  };
  if (kc.scalar_type() == at::kBFloat16) {
    with_q(kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>());
  } else if (kc.scalar_type() == at::kHalf) {
    with_q(kc.data_ptr<at::Half>(), vc.data_ptr<at::Half>());
  } else {
    TORCH_CHECK(kc.scalar_type() == at::kFloat, "decode_attention: caches float32, bfloat16 or float16");
    with_q(kc.data_ptr<float>(), vc.data_ptr<float>());
  }
  return out;
}

// ------------------------------------------------------------------------------ prefill attention

#pragma GCC push_options
#pragma GCC target("avx512bf16")

constexpr int kTile = 8;     // queries a tile
constexpr int kChunk = 64;   // keys a softmax step

inline __m512 dot_pairs(__m512 acc, uint32_t a, __m512i b) {  // acc + the two bf16 products a lane
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), (__m512bh)b);
}

// scores[r][32 * half + j] = q_r . k_j for the tile's 8 queries (pairs [8][P]) and one 32-key half
// of a chunk (two blocks of the packed K, each [P][16] pairs).
inline void tile_scores(const uint32_t* q, const uint32_t* k_blocks, int64_t P, float* scores) {
  __m512 acc[kTile][2];
  for (int r = 0; r < kTile; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* k1 = k_blocks + P * 16;
  for (int64_t p = 0; p < P; p++) {
    const __m512i a = _mm512_loadu_si512(k_blocks + p * 16), b = _mm512_loadu_si512(k1 + p * 16);
    for (int r = 0; r < kTile; r++) {
      acc[r][0] = dot_pairs(acc[r][0], q[r * P + p], a);
      acc[r][1] = dot_pairs(acc[r][1], q[r * P + p], b);
    }
  }
  for (int r = 0; r < kTile; r++) {
    _mm512_storeu_ps(scores + r * kChunk, acc[r][0]);
    _mm512_storeu_ps(scores + r * kChunk + 16, acc[r][1]);
  }
}

// out[r] += p_r . V over one chunk for ROWS queries (probabilities as bf16 pairs [ROWS][32], V as
// [32 key pairs][VECS * 16] pairs), out fp32 [ROWS][VECS * 16].
template <int VECS, int ROWS>
inline void tile_values(const uint32_t* p, const uint32_t* v, float* out) {
  __m512 acc[ROWS][VECS];
  for (int r = 0; r < ROWS; r++)
    for (int j = 0; j < VECS; j++) acc[r][j] = _mm512_loadu_ps(out + (r * VECS + j) * 16);
  for (int jp = 0; jp < kChunk / 2; jp++) {
    __m512i vv[VECS];
    for (int j = 0; j < VECS; j++) vv[j] = _mm512_loadu_si512(v + (jp * VECS + j) * 16);
    for (int r = 0; r < ROWS; r++)
      for (int j = 0; j < VECS; j++) acc[r][j] = dot_pairs(acc[r][j], p[r * kChunk / 2 + jp], vv[j]);
  }
  for (int r = 0; r < ROWS; r++)
    for (int j = 0; j < VECS; j++) _mm512_storeu_ps(out + (r * VECS + j) * 16, acc[r][j]);
}

// One query head's tile of 8 queries (the first at position `first`), keys [0, first + 8) at most.
// k: packed [blocks][P][16] pairs; v: packed [L / 2][D] pairs; q: the tile's pairs [8][P].
template <int VECS>
void attend_tile(const uint32_t* q, const uint32_t* k, const uint32_t* v, int64_t first, int rows, float scale,
                 at::BFloat16* out, int64_t out_stride) {
  constexpr int D = VECS * 16, P = D / 2, ROWS = std::min(8, 16 / VECS);
  alignas(64) float scores[kTile * kChunk];
  alignas(64) uint32_t probs[kTile * kChunk / 2];
  alignas(64) float acc[kTile * D] = {};
  float top[kTile], total[kTile];
  std::fill(top, top + kTile, kMasked);
  std::fill(total, total + kTile, 0.f);
  const int64_t keys = first + rows;  // the last query sees keys [0, first + rows)
  for (int64_t c = 0; c * kChunk < keys; c++) {
    const int64_t k0 = c * kChunk;
    tile_scores(q, k + (k0 / 16) * P * 16, P, scores);
    tile_scores(q, k + (k0 / 16 + 2) * P * 16, P, scores + 32);
    for (int r = 0; r < kTile; r++) {
      float* s = scores + r * kChunk;
      const int64_t visible = first + r + 1 - k0;  // keys of this chunk query r sees
      __m512 x[4];
      __m512 m = _mm512_set1_ps(kMasked);
      for (int j = 0; j < 4; j++) {
        x[j] = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * j), _mm512_set1_ps(scale));
        if (visible < 16 * (j + 1)) {
          const int64_t n = std::clamp<int64_t>(visible - 16 * j, 0, 16);
          x[j] = _mm512_mask_mov_ps(_mm512_set1_ps(kMasked), static_cast<__mmask16>((1u << n) - 1), x[j]);
        }
        m = _mm512_max_ps(m, x[j]);
      }
      const float new_top = std::max(top[r], _mm512_reduce_max_ps(m));
      const float rescale = std::exp(top[r] - new_top);  // 0 on the first chunk (top -inf)
      top[r] = new_top;
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < 4; j += 2) {
        const __m512 e0 = exp16(_mm512_sub_ps(x[j], _mm512_set1_ps(new_top)));
        const __m512 e1 = exp16(_mm512_sub_ps(x[j + 1], _mm512_set1_ps(new_top)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        // pairs of neighbouring keys: (e0[2i], e0[2i+1]) is pair i of this 32-key half
        _mm512_storeu_si512(probs + r * kChunk / 2 + 8 * j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      total[r] = total[r] * rescale + _mm512_reduce_add_ps(sum);
      if (rescale != 1.f)
        for (int j = 0; j < D; j += 16)
          _mm512_storeu_ps(acc + r * D + j, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + j), _mm512_set1_ps(rescale)));
    }
    for (int r = 0; r < kTile; r += ROWS)
      tile_values<VECS, ROWS>(probs + r * kChunk / 2, v + (k0 / 2) * D, acc + r * D);
  }
  for (int r = 0; r < rows; r++) {
    float row[D];
    const __m512 inv = _mm512_set1_ps(1.f / total[r]);
    for (int j = 0; j < D; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + j), inv));
    store_row(out + r * out_stride, row, D);
  }
}

// K [L, Hkv, D] of one KV head as [L' / 16][D / 2][16] pairs and V as [L' / 2][D] pairs, L' = L
// rounded up to a chunk, zeros past L (never seen: they lie past every query's position).
void pack_kv(const at::BFloat16* k, const at::BFloat16* v, int64_t L, int64_t padded, int64_t Hkv, int64_t D,
             int64_t g, uint32_t* k_out, uint32_t* v_out) {
  const int64_t P = D / 2;
  const auto bits = [](const at::BFloat16* x) { return static_cast<uint32_t>(x->x); };
  for (int64_t j = 0; j < padded; j++) {
    const at::BFloat16* kj = k + (j * Hkv + g) * D;
    for (int64_t p = 0; p < P; p++)
      k_out[((j / 16) * P + p) * 16 + j % 16] = j < L ? bits(kj + 2 * p) | bits(kj + 2 * p + 1) << 16 : 0;
  }
  for (int64_t jp = 0; jp < padded / 2; jp++) {
    for (int64_t d = 0; d < D; d++) {
      const int64_t j = 2 * jp;
      const uint32_t lo = j < L ? bits(v + (j * Hkv + g) * D + d) : 0;
      const uint32_t hi = j + 1 < L ? bits(v + ((j + 1) * Hkv + g) * D + d) : 0;
      v_out[jp * D + d] = lo | hi << 16;
    }
  }
}

// out [Lq, H, D] = causal softmax(q K^T * scale) V, q [Lq, H, D] the last Lq positions of the
// sequence whose K/V are k, v [L, Hkv, D]; bf16, D 32, 64 or 128.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.scalar_type() == at::kBFloat16 &&
              k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attention: bf16 q [Lq, H, D], k and v [L, Hkv, D]");
  const int64_t Lq = q.size(0), H = q.size(1), D = q.size(2), L = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(k.size(2) == D && (D == 32 || D == 64 || D == 128) && H % Hkv == 0 && Lq <= L,
              "prefill_attention: shapes do not match");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc);
  const int64_t padded = (L + kChunk - 1) / kChunk * kChunk, P = D / 2, G = H / Hkv;
  std::vector<uint32_t> k_packed(Hkv * padded * P), v_packed(Hkv * padded * P);
  const auto* q_p = qc.data_ptr<at::BFloat16>();
  at::parallel_for(0, Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++)
      pack_kv(kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>(), L, padded, Hkv, D, g,
              k_packed.data() + g * padded * P, v_packed.data() + g * padded * P);
  });
  const int64_t tiles = (Lq + kTile - 1) / kTile;
  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> q_tile(kTile * P);
    for (int64_t i = begin; i < end; i++) {
      const int64_t h = i / tiles, t0 = i % tiles * kTile, g = h / G;
      const int rows = static_cast<int>(std::min<int64_t>(kTile, Lq - t0));
      std::fill(q_tile.begin(), q_tile.end(), 0u);
      for (int r = 0; r < rows; r++)
        std::copy_n(reinterpret_cast<const uint32_t*>(q_p + ((t0 + r) * H + h) * D), P, q_tile.data() + r * P);
      const uint32_t *kg = k_packed.data() + g * padded * P, *vg = v_packed.data() + g * padded * P;
      at::BFloat16* o = out.data_ptr<at::BFloat16>() + (t0 * H + h) * D;
      const int64_t first = L - Lq + t0;
      const float s = static_cast<float>(scale);
      switch (D) {
        case 32: attend_tile<2>(q_tile.data(), kg, vg, first, rows, s, o, H * D); break;
        case 64: attend_tile<4>(q_tile.data(), kg, vg, first, rows, s, o, H * D); break;
        default: attend_tile<8>(q_tile.data(), kg, vg, first, rows, s, o, H * D); break;
      }
    }
  });
  return out;
}

#pragma GCC pop_options

}  // namespace

TORCH_LIBRARY_FRAGMENT(picochat_cpu, lib) {
  lib.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor context_slots, Tensor bias, float scale) -> Tensor");
  lib.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(picochat_cpu, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("prefill_attention", &prefill_attention);
}
