// AVX-512 helpers the AMX translation unit shares with the AVX-512 one (include only from TUs compiled with the
// AVX-512 flags).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace compressor {

// Word kw of a tile pair (Weights::pair_words) as one vector: 16 rows x 4 bytes, the even tile's rows first.
inline __m512i avx512_load_pair(const uint32_t* pair, int64_t kw) { return _mm512_loadu_si512(pair + kw * 16); }

}  // namespace compressor
