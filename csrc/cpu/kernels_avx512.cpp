// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bf16 -mavx2 -mfma; chosen at
// run time only when the CPU and OS support AVX-512F/BW/VL and VNNI). A 512-bit vector holds two 8-row tiles.
// The int8-activation GEMV uses VNNI (vpdpbusd: u8 x s8 -> s32, no int16 saturation); the GEMM uses a 12x16
// register tile. Results are bit-identical to the scalar reference (integer sums are exact, float ops in the
// same order).
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels_avx2.h"

namespace compressor {
namespace {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline __m512i load_pair(const __m256i* w0, const __m256i* w1, int64_t kw) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(w0 + kw)), _mm256_loadu_si256(w1 + kw), 1);
}

template <WKind KIND>
void gemv_q8_t(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  const int64_t Kw = W.Kw();
  const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t t = t0; t < t1; t += 2) {
    const __m256i* w0 = reinterpret_cast<const __m256i*>(W.w + t * Kw * 8);
    const __m256i* w1 = w0 + Kw;
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* q = A.q + m * W.Kp;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t b = 0; b < A.NB; ++b) {
        const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
        __m512i i = _mm512_setzero_si512();
        if constexpr (KIND == WKind::Int4) {
          for (int64_t kw = k0 / 8; kw < k1 / 8; ++kw) {
            const __m512i v = load_pair(w0, w1, kw);
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            i = _mm512_dpbusd_epi32(i, lo, _mm512_set1_epi32(load_i32(q + kw * 8)));
            i = _mm512_dpbusd_epi32(i, hi, _mm512_set1_epi32(load_i32(q + kw * 8 + 4)));
          }
        } else {
          // q + 128 as the unsigned operand; subtract 128 * sum(x) afterwards (exact in int32)
          for (int64_t kw = k0 / 4; kw < k1 / 4; ++kw) {
            const __m512i u = _mm512_xor_si512(load_pair(w0, w1, kw), flip);
            i = _mm512_dpbusd_epi32(i, u, _mm512_set1_epi32(load_i32(q + kw * 4)));
          }
          i = _mm512_sub_epi32(i, _mm512_set1_epi32(128 * A.qsum[m * A.NB + b]));
        }
        const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(W.s + W.group_of(k0) * W.Np + t * 8),
                                        _mm512_set1_ps(A.xs[m * A.NB + b]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sc, acc);
      }
      for (int64_t g = 0; g < W.G; ++g)
        acc = _mm512_fnmadd_ps(_mm512_loadu_ps(W.zs + g * W.Np + t * 8), _mm512_set1_ps(A.tg[m * W.G + g]), acc);
      _mm512_storeu_ps(y + m * W.Np + t * 8, acc);
    }
  }
}

void gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  if (W.kind == WKind::Int4)
    gemv_q8_t<WKind::Int4>(W, A, y, t0, t1);
  else
    gemv_q8_t<WKind::Int8>(W, A, y, t0, t1);
}

// y[MR][16] += x[MR][kc] * B[kc][16], the panel's products summed on their own first (as in the AVX2 kernel)
template <int MR>
void ukernel(const float* B, int64_t kc, const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m512 c[MR];
  for (int r = 0; r < MR; ++r) c[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b = _mm512_loadu_ps(B + k * 16);
    for (int r = 0; r < MR; ++r) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), b, c[r]);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + r * ldy, _mm512_add_ps(_mm512_loadu_ps(y + r * ldy), c[r]));
}

template <int MR>
void ukernel_rows(const float* B, int64_t kc, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows) {
  if constexpr (MR > 1) {
    if (rows < MR) return ukernel_rows<MR - 1>(B, kc, x, ldx, y, ldy, rows);
  }
  ukernel<MR>(B, kc, x, ldx, y, ldy);
}

void gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  alignas(64) float B[kGemmKc * 16];
  for (int64_t k0 = 0; k0 < W.Kp; k0 += kGemmKc) {
    const int64_t kc = std::min(kGemmKc, W.Kp - k0);
    for (int64_t t = t0; t < t1; t += 2) {
      avx2_dequant_panel(W, t, k0, kc, B);
      for (int64_t m0 = 0; m0 < X.M; m0 += 12)
        ukernel_rows<12>(B, kc, X.x + m0 * W.Kp + k0, W.Kp, y + m0 * W.Np + t * 8, W.Np,
                         std::min<int64_t>(12, X.M - m0));
    }
  }
}

const KernelTable kTable{"avx512", gemv_q8, avx2_gemv_f32, gemm_f32};

}  // namespace

const KernelTable* avx512_kernels() { return &kTable; }

}  // namespace compressor

#else

namespace compressor {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace compressor

#endif
