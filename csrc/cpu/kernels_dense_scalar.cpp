// Scalar reference of the dense 16-bit weight product (the summation order of kernels_dense.h, spelled out).
#include <cmath>

#include "kernels.h"
#include "kernels_dense.h"

namespace compressor {
namespace {

void dense_scalar(const Dense16& D, int64_t n0, int64_t n1) {
  const auto widen = D.half == Half::BF16 ? bf16_bits_to_float : half_bits_to_float;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = D.w + n * D.K;
    for (int64_t m = 0; m < D.M; ++m) {
      const float* x = D.x + m * D.ldx;
      float c[kDenseChains] = {};
      for (int64_t k0 = 0; k0 < D.steps() * kDenseChains; k0 += kDenseChains)
        for (int j = 0; j < kDenseChains; ++j) {
          const int64_t k = k0 + j;
          c[j] = std::fmaf(k < D.K ? widen(w[k]) : 0.f, x[k], c[j]);  // x is zero past K
        }
      float s8[8], s4[4];
      for (int j = 0; j < 8; ++j) s8[j] = c[j] + c[j + 8];
      for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
      const float s = (s4[0] + s4[2]) + (s4[1] + s4[3]);
      D.y[m * D.N + n] = D.bias ? s + D.bias[n] : s;
    }
  }
}

}  // namespace

DenseKernel dense_scalar_kernel() { return dense_scalar; }

}  // namespace compressor
