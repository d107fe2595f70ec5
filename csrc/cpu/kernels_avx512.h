// AVX-512 helpers the AMX translation unit shares with the AVX-512 one (include only from TUs compiled with the
// AVX-512 flags).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace compressor {

// Word kw of two consecutive 8-row tiles (w0, w1 = w0 + Kw) as one vector: 16 rows x 4 bytes, w0's rows first.
inline __m512i avx512_load_pair(const __m256i* w0, const __m256i* w1, int64_t kw) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(w0 + kw)), _mm256_loadu_si256(w1 + kw), 1);
}

}  // namespace compressor
