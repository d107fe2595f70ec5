// AVX-512 dense 16-bit weight product (kernels_dense.h; compiled with -mavx512f/bw/vl/dq -mavx2 -mfma -mf16c and
// chosen when the extension's AVX-512 path is): one zmm holds the 16 chains of a (row, weight row) pair. Weights are
// widened exactly, bfloat16 by a shift into the high half of each lane, float16 by vcvtph2ps.
#include "kernels_dense.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>

#include "kernels_dense_impl.h"

namespace compressor {
namespace {

struct Avx512 {
  using Vec = __m512;
  static constexpr int kLanes = 16, kParts = 1;
  static constexpr int kGemvRows = 8;  // 8 chains at M = 1
  // 16 chains in registers; of the tiles tried (one thread, M = 128, K = 4096, N = 512, C++ harness) 4 x 4 ran at
  // 180 GFLOP/s, 2 x 4 / 3 x 4 / 4 x 5 / 4 x 6 / 6 x 4 / 8 x 3 / 3 x 8 at 110-145
  static constexpr int kMR = 4, kNR = 4;

  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }

  template <Half H>
  static Vec widen_bits(__m256i h) {
    if constexpr (H == Half::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
  template <Half H>
  static Vec widen(const uint16_t* p, int) {
    return widen_bits<H>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <Half H>
  static Vec widen_tail(const uint16_t* p, int, int64_t n) {
    return widen_bits<H>(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
  }

  // The tree of kernels_dense.h for 4 chain sets a..d; out = their sums. Step 1 pairs 128-bit lanes 0|2 and 1|3 of
  // each (c[j] + c[j + 8]), step 2 the two halves of each s8, steps 3 and 4 within 128-bit lanes. (The maskz forms
  // with a full mask are the plain instructions; GCC 12 reports the plain intrinsics' undefined pass-through
  // operand as used uninitialized, -Wuninitialized, when they are inlined here.)
  static void reduce4(const Vec (*acc)[kParts], float* out) {
    constexpr __mmask16 all = 0xFFFF;
    const Vec a = acc[0][0], b = acc[1][0], c = acc[2][0], d = acc[3][0];
    const Vec ab =
        _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, a, b, 0x44), _mm512_maskz_shuffle_f32x4(all, a, b, 0xEE));
    const Vec cd =
        _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, c, d, 0x44), _mm512_maskz_shuffle_f32x4(all, c, d, 0xEE));
    const Vec s4 =
        _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, ab, cd, 0x88), _mm512_maskz_shuffle_f32x4(all, ab, cd, 0xDD));
    // lanes 0, 1 of each 4: s4[j] + s4[j + 2]; then lane 0 of each 4: s2[0] + s2[1]
    const Vec s2 = _mm512_add_ps(s4, _mm512_maskz_permute_ps(all, s4, 0xEE));
    const Vec s1 = _mm512_add_ps(s2, _mm512_maskz_permute_ps(all, s2, 0x01));
    const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_mask_storeu_ps(out, 0x000F, _mm512_maskz_permutexvar_ps(all, firsts, s1));
  }
};

}  // namespace

DenseKernel dense_avx512_kernel() { return dense_kernel<Avx512>; }

}  // namespace compressor

#else

namespace compressor {
DenseKernel dense_avx512_kernel() { return nullptr; }
}  // namespace compressor

#endif
