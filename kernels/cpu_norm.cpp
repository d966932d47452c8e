// picochat_cpu::rms_norm and picochat_cpu::add_rms_norm — RMSNorm (with the residual add before it)
// of bf16 / fp16 rows, built into one library with cpu_vnni.cpp by cpu_vnni.py.
//
// The same op serves the eager forward and the compiled decode step, so both take the same sums:
// inductor's own reduction for the norm summed x^2 in another order in its batch graph than in its
// batch-1 graph and than aten's mean, and greedy tokens of the compiled step drifted from the eager
// step's. Each row is summed the same way whatever rows are beside it. Rounding follows
// kernels/reference.py's rms_norm: s = x + residual in x's dtype, then
// weight * (s * rsqrt(mean(s^2) + eps) in fp32, rounded to x's dtype), rounded to x's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

using picochat_simd::load16;

inline __m512 round_to(const at::BFloat16*, __m512 v) { return picochat_simd::round_bf16(v); }
inline __m512 round_to(const at::Half*, __m512 v) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline void store16(at::BFloat16* out, __m512 rounded) {  // an already rounded value
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), picochat_simd::bf16_halves(rounded));
}
inline void store16(at::Half* out, __m512 rounded) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(rounded, _MM_FROUND_TO_NEAREST_INT));
}

// rows [T, D] (D % 16 == 0): out = norm(x + residual) and, with residual, sum_out = x + residual.
template <typename T>
void norm_rows(const T* x, const T* residual, const T* weight, float eps, T* out, T* sum_out, int64_t rows,
               int64_t D) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const T* xr = x + r * D;
      T* sr = sum_out ? sum_out + r * D : nullptr;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t j = 0; j < D; j += 16) {
        __m512 v = load16(xr + j);
        if (residual) {
          v = round_to(xr, _mm512_add_ps(v, load16(residual + r * D + j)));
          store16(sr + j, v);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const T* s = residual ? sr : xr;
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(D) + eps);
      for (int64_t j = 0; j < D; j += 16) {
        const __m512 normed = round_to(s, _mm512_mul_ps(load16(s + j), _mm512_set1_ps(inv)));
        store16(out + r * D + j, round_to(s, _mm512_mul_ps(load16(weight + j), normed)));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                                        double eps) {
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
              weight.scalar_type() == x.scalar_type() && (!residual || residual->scalar_type() == x.scalar_type()),
              "rms_norm: x, residual and weight all bf16 or all fp16");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D % 16 == 0 && weight.numel() == D && (!residual || residual->sizes() == x.sizes()),
              "rms_norm: shapes do not match (last dim a multiple of 16)");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc), sum = residual ? at::empty_like(xc) : at::Tensor();
  const int64_t rows = D ? xc.numel() / D : 0;
  if (x.scalar_type() == at::kBFloat16) {
    using T = at::BFloat16;
    norm_rows<T>(xc.data_ptr<T>(), residual ? rc.data_ptr<T>() : nullptr, wc.data_ptr<T>(), static_cast<float>(eps),
                 out.data_ptr<T>(), residual ? sum.data_ptr<T>() : nullptr, rows, D);
  } else {
    using T = at::Half;
    norm_rows<T>(xc.data_ptr<T>(), residual ? rc.data_ptr<T>() : nullptr, wc.data_ptr<T>(), static_cast<float>(eps),
                 out.data_ptr<T>(), residual ? sum.data_ptr<T>() : nullptr, rows, D);
  }
  return {out, sum};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm(x, nullptr, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return norm(x, &residual, weight, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(picochat_cpu, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(picochat_cpu, CPU, lib) {
  lib.impl("rms_norm", &rms_norm);
  lib.impl("add_rms_norm", &add_rms_norm);
}
