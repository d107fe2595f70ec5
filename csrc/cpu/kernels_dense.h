// Dense 16-bit weights: y = x W^T (+ b) with W [N][K] bfloat16 or float16, row-major as the artifact stores it, and
// float32 activations. Every weight is widened exactly to float32 and every product accumulated in float32 (no
// bfloat16 dot-product instructions: vdpbf16ps would round the activations to bfloat16).
//
// The result is defined by one summation order, the same on every ISA and for every M (the scalar reference
// spells it out): for each (m, n), 16 chains c[j] = fma(w[n][k], x[m][k], c[j]) over k = j, j + 16, ... (columns
// past K count as 0 x 0), then the tree c[j] + c[j + 8] (j < 8), s8[j] + s8[j + 4] (j < 4), s4[j] + s4[j + 2]
// (j < 2), s2[0] + s2[1], then + b[n]. So the SIMD paths return exactly what the scalar reference returns.
#pragma once

#include <cstdint>

namespace compressor {

enum class Half : int { BF16 = 0, F16 = 1 };

constexpr int64_t kDenseChains = 16;  // columns per step, one float32 chain each
constexpr int64_t kDenseUnit = 16;    // weight rows per unit of work (the threads split N in whole units)

struct Dense16 {
  const uint16_t* w;  // [N][K] 16-bit weights (row stride K)
  Half half;
  const float* x;     // [M][ldx] float32 activations, zero from column K to round_up(K, 16)
  const float* bias;  // [N] float32, or nullptr
  float* y;           // [M][N] float32
  int64_t M, N, K, ldx;
  int64_t steps() const { return (K + kDenseChains - 1) / kDenseChains; }
};

// Computes y[m][n] for every m and the rows n0 <= n < n1 (single-threaded; writes no other rows).
using DenseKernel = void (*)(const Dense16&, int64_t n0, int64_t n1);

DenseKernel dense_scalar_kernel();
DenseKernel dense_avx2_kernel();    // nullptr when the TU was compiled without AVX2 / FMA / F16C
DenseKernel dense_avx512_kernel();  // nullptr when the TU was compiled without AVX-512 F/BW/VL/DQ

}  // namespace compressor
