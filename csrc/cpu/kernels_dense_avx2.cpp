// AVX2 dense 16-bit weight product (kernels_dense.h; compiled with -mavx2 -mfma -mf16c): two ymm hold the 16 chains
// of a (row, weight row) pair, lanes 0-7 and 8-15. Weights are widened exactly, bfloat16 by a shift into the high
// half of each lane, float16 by vcvtph2ps (F16C).
#include "kernels_dense.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels_dense_impl.h"

namespace compressor {
namespace {

struct Avx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8, kParts = 2;
  static constexpr int kGemvRows = 4;  // 8 chains at M = 1
  // GEMM: 12 chains of one part in registers, 3 activation vectors, a weight vector. One thread, M = 128, K = 4096,
  // N = 512 (C++ harness, Zen 5 running AVX2 code): 3 x 4 at 105-110 GFLOP/s, 2 x 4 / 2 x 5 / 2 x 6 / 4 x 3 at 75-95,
  // 2 x 2 with both parts in registers (the first version) at 45
  static constexpr int kMR = 3, kNR = 4;

  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }

  template <Half H>
  static Vec widen_bits(__m128i h) {
    if constexpr (H == Half::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
  template <Half H>
  static Vec widen(const uint16_t* p, int part) {
    return widen_bits<H>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + part * kLanes)));
  }
  template <Half H>
  static Vec widen_tail(const uint16_t* p, int part, int64_t n) {
    uint16_t buf[kLanes] = {};  // AVX2 has no 16-bit masked load
    const int64_t valid = std::clamp<int64_t>(n - part * kLanes, 0, kLanes);
    std::memcpy(buf, p + part * kLanes, valid * sizeof(uint16_t));
    return widen_bits<H>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(buf)));
  }

  // The tree of kernels_dense.h for 4 chain sets a..d (lanes 0-7 in part 0, 8-15 in part 1); out = their sums.
  static void reduce4(const Vec (*acc)[kParts], float* out) {
    __m256 s8[4];
    for (int t = 0; t < 4; ++t) s8[t] = _mm256_add_ps(acc[t][0], acc[t][1]);  // c[j] + c[j + 8]
    // s8[j] + s8[j + 4]: [s4a | s4b] and [s4c | s4d]
    auto halves = [](__m256 u, __m256 v) {
      return _mm256_add_ps(_mm256_permute2f128_ps(u, v, 0x20), _mm256_permute2f128_ps(u, v, 0x31));
    };
    const __m256 ab = halves(s8[0], s8[1]), cd = halves(s8[2], s8[3]);
    // s4[j] + s4[j + 2]: [s2a0 s2a1 s2c0 s2c1 | s2b0 s2b1 s2d0 s2d1]
    const __m256 s2 = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    // s2[0] + s2[1]: [a c a c | b d b d]
    const __m256 s1 = _mm256_add_ps(_mm256_shuffle_ps(s2, s2, 0x88), _mm256_shuffle_ps(s2, s2, 0xDD));
    _mm_storeu_ps(out, _mm_unpacklo_ps(_mm256_castps256_ps128(s1), _mm256_extractf128_ps(s1, 1)));
  }
};

}  // namespace

DenseKernel dense_avx2_kernel() { return dense_kernel<Avx2>; }

}  // namespace compressor

#else

namespace compressor {
DenseKernel dense_avx2_kernel() { return nullptr; }
}  // namespace compressor

#endif
