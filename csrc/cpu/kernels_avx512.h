// AVX-512 helpers the AMX translation unit shares with the AVX-512 ones (include only from TUs compiled with the
// AVX-512 flags).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace compressor {

// Word kw of a tile pair (Weights::pair_words) as one vector: 16 rows x 4 bytes, the even tile's rows first.
inline __m512i avx512_load_pair(const uint32_t* pair, int64_t kw) {
  return _mm512_loadu_si512(pair + kw * kPairWordStride);
}

// acc + vpdpbusd(u, s) in place. GCC 12 compiles _mm512_dpbusd_epi32 into a register copy of the accumulator
// per instruction (its builtin does not tie the accumulator to the output): the 4-pair GEMV loop ran 16 vmovdqa
// per 8 dot products, 7.5-8.6 cycles per step of 4 lines against 5.8-7.0 with this form (L2-resident, Zen 5).
inline __m512i avx512_dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// Scales of 16 rows from column col of group g as float32 (16-bit storage widened exactly: vcvtph2ps for
// float16, the bits moved to the high half for bfloat16)
inline __m512 avx512_scale_row(const Weights& W, int64_t g, int64_t col) {
  const char* p = W.scale_addr(g, col);
  if (W.stype == SType::F32) return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (W.stype == SType::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// z * s of 16 rows from column col of group g: the stored row, or zoff * s for symmetric weights (exact)
inline __m512 avx512_zs_row(const Weights& W, int64_t g, int64_t col) {
  if (W.zs) return _mm512_loadu_ps(W.zs + g * W.Np + col);
  return _mm512_mul_ps(avx512_scale_row(W, g, col), _mm512_set1_ps(W.zoff));
}

}  // namespace compressor
