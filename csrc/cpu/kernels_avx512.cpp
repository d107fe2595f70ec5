// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bf16 -mavx2 -mfma; chosen at
// run time only when the CPU and OS support AVX-512F/BW/VL and VNNI). A 512-bit vector holds two 8-row tiles.
// The int8-activation GEMV uses VNNI (vpdpbusd: u8 x s8 -> s32, no int16 saturation); the GEMM uses a 12x16
// register tile. Results are bit-identical to the scalar reference (integer sums are exact, float ops in the
// same order).
// This translation unit: int8 activation quantization, the streaming read and the kernel table; the kernels are in
// kernels_avx512_q8.cpp (int8 activations) and kernels_avx512_f32.cpp (float activations).
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>

#include "avx512_decode.h"

namespace compressor {
namespace {

// ---- activation quantization, streaming read ----------------------------------------------------------------

void quantize(const float* x, int64_t K, int64_t Kp, int64_t ldq, int64_t ablk, ActPerm perm, int8_t* q, float* xs,
              int32_t* qsum, int64_t m0, int64_t m1) {
  const int64_t NB = (Kp + ablk - 1) / ablk;
  // the 16 bytes of columns k .. k + 15 in the order of act_pos (int2: a 4 x 4 transpose, its own inverse)
  const __m128i order = perm == ActPerm::Int2 ? _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
                                              : _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * ldq;
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t k0 = b * ablk, k1 = std::min(k0 + ablk, K);
      auto mask = [&](int64_t k) {
        return static_cast<__mmask16>(k1 - k >= 16 ? 0xFFFF : (1u << (k1 - k)) - 1);
      };
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask(k), xr + k)));
      const float amax = _mm512_reduce_max_ps(mx);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 16) {  // k + 16 <= k0 + ablk: the store stays inside the block
        const __m512 v = _mm512_maskz_loadu_ps(mask(k), xr + k);
        const __m512i c = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), lo), hi);
        sum = _mm512_add_epi32(sum, c);
        __m128i bytes = _mm512_cvtepi32_epi8(c);
        if (perm != ActPerm::None) bytes = _mm_shuffle_epi8(bytes, order);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), bytes);
      }
      xs[m * NB + b] = amax / 127.f;
      qsum[m * NB + b] = _mm512_reduce_add_epi32(sum);
    }
  }
}

uint64_t read(const uint8_t* p, int64_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < bytes; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  alignas(64) uint64_t words[8];
  _mm512_store_si512(words, _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
  uint64_t r = 0;
  for (uint64_t v : words) r ^= v;
  return r;
}

const KernelTable kTable{"avx512", avx512_gemv_q8, avx512_gemm_q8, avx512_gemv_f32, avx512_gemm_f32, quantize, read};

}  // namespace

const KernelTable* avx512_kernels() { return &kTable; }

}  // namespace compressor

#else

namespace compressor {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace compressor

#endif
