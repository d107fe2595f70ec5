// AVX2 + FMA kernels (compiled with -mavx2 -mfma; chosen at run time only when the CPU and OS support them).
// Lanes of a 256-bit vector are the 8 rows of a weight tile, so accumulators never need horizontal sums.
// This translation unit: int8 activation quantization and the kernel table; the kernels themselves are in
// kernels_avx2_q8.cpp (int8 activations) and kernels_avx2_f32.cpp (float activations), sharing avx2_decode.h.
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>

#include "avx2_decode.h"

namespace compressor {
namespace {

// ---- activation quantization -----------------------------------------------------------------------------

// int8 codes of 8 columns (int32 lanes in [-127, 127]) as 8 bytes, in the int4 order [0, 2, 4, 6, 1, 3, 5, 7] when
// perm: each 128-bit half shuffles its 4 low bytes to their places, the halves are ORed
inline __m128i codes_to_bytes(__m256i c, bool perm) {
  const __m256i order = perm ? _mm256_setr_epi8(0, 8, -1, -1, 4, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                -1, -1, 0, 8, -1, -1, 4, 12, -1, -1, -1, -1, -1, -1, -1, -1)
                             : _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(c, order);
  return _mm_or_si128(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

// As scalar_quantize, 8 columns at a time (the same float operations: |x| max, x * (127 / amax) rounded to nearest
// even by the MXCSR default, clamped): bit-identical codes, scales and sums. Until 2026-12-05 the AVX2 table used
// the scalar loop.
void quantize(const float* x, int64_t K, int64_t Kp, int64_t ldq, int64_t ablk, ActPerm perm, int8_t* q, float* xs,
              int32_t* qsum, int64_t m0, int64_t m1) {
  // int2 order: 16 columns at a time (a 4 x 4 transpose of their bytes, its own inverse)
  const __m128i transpose = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int64_t NB = (Kp + ablk - 1) / ablk;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), lo = _mm256_set1_epi32(-127),
                hi = _mm256_set1_epi32(127);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * ldq;
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t k0 = b * ablk, k1 = std::min(k0 + ablk, K);
      // columns k .. k + 7 that are < k1 (zeros past it)
      auto load = [&](int64_t k) {
        if (k1 - k >= 8) return _mm256_loadu_ps(xr + k);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(k1 - k)), lanes);
        return _mm256_maskload_ps(xr + k, mask);
      };
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load(k), abs_mask));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i sum = _mm256_setzero_si256();
      auto codes = [&](int64_t k) {
        const __m256i c = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load(k), inv)), lo), hi);
        sum = _mm256_add_epi32(sum, c);
        return c;
      };
      if (perm == ActPerm::Int2) {
        for (int64_t k = k0; k < k1; k += 16) {  // k + 16 <= k0 + ablk (blocks are multiples of 32 columns)
          const __m128i lo8 = codes_to_bytes(codes(k), false), hi8 = codes_to_bytes(codes(k + 8), false);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k),
                           _mm_shuffle_epi8(_mm_unpacklo_epi64(lo8, hi8), transpose));
        }
      } else {
        for (int64_t k = k0; k < k1; k += 8)  // k + 8 <= k0 + ablk: the store stays inside the block
          _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), codes_to_bytes(codes(k), perm == ActPerm::Int4));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      xs[m * NB + b] = amax / 127.f;
      qsum[m * NB + b] = _mm_cvtsi128_si32(s4);
    }
  }
}

const KernelTable kTable{"avx2", avx2_gemv_q8, avx2_gemm_q8, avx2_gemv_f32, avx2_gemm_f32, quantize, scalar_read};

}  // namespace

const KernelTable* avx2_kernels() { return &kTable; }

}  // namespace compressor

#else

namespace compressor {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace compressor

#endif
