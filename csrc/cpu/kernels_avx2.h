// AVX2 helpers the AVX-512 kernels reuse (an AVX-512 CPU always has AVX2); defined in kernels_avx2_f32.cpp.
#pragma once

#include "kernels.h"

namespace compressor {

// Dequantized float32 panel B[kc][16] of rows 8t .. 8t+15, columns k0 .. k0+kc-1.
void avx2_dequant_panel(const Weights& W, int64_t t, int64_t k0, int64_t kc, float* B);

}  // namespace compressor
