// AVX2 kernels for int / fp8 weights x float activations (compiled with the AVX2 flags, see kernels_avx2.cpp):
// the small-M GEMV with float32 accumulation, and the blocked GEMM on a dequantized weight panel (the panel,
// avx2_dequant_panel, is shared with the AVX-512 GEMM). Float operations in the scalar reference's order.
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>

#include "avx2_decode.h"
#include "kernels_avx2.h"

namespace compressor {
namespace {

// Column k accumulates into chain k % 4 (4 independent FMA chains per tile hide the FMA latency). int4 codes are
// centred (u - 8), as in the scalar reference: see its gemv_f32.
// int2 codes centred by table lookup: vpermps reads the low 3 bits of each lane, so the word shifted to code I
// indexes u - 2 (bit 2 ignored by the table): a shift and a lookup per code instead of two shifts and a convert.
template <int I>
inline __m256 decode_int2_lookup(__m256i v) {
  const __m256 table = _mm256_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1);
  return _mm256_permutevar8x32_ps(table, I ? _mm256_srli_epi32(v, 2 * I) : v);
}

template <WKind KIND>
inline void fma_word(__m256i v0, __m256i v1, const float* x, __m256* a0, __m256* a1) {
  if constexpr (KIND == WKind::Int2) {
    auto step = [&](auto ic) {
      constexpr int I = decltype(ic)::value;
      const __m256 xi = _mm256_set1_ps(x[I]);
      a0[I % 4] = _mm256_fmadd_ps(decode_int2_lookup<I>(v0), xi, a0[I % 4]);
      a1[I % 4] = _mm256_fmadd_ps(decode_int2_lookup<I>(v1), xi, a1[I % 4]);
    };
    unroll<16>(step);
    return;
  }
  if constexpr (KIND == WKind::Int4) {
    const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x88888888u));
    v0 = _mm256_xor_si256(v0, flip);
    v1 = _mm256_xor_si256(v1, flip);
  }
  auto step = [&](auto ic) {
    constexpr int I = decltype(ic)::value;
    const __m256 xi = _mm256_set1_ps(x[I]);
    a0[I % 4] = _mm256_fmadd_ps(decode_centred<KIND, I>(v0), xi, a0[I % 4]);
    a1[I % 4] = _mm256_fmadd_ps(decode_centred<KIND, I>(v1), xi, a1[I % 4]);
  };
  unroll<kpw<KIND>()>(step);
}

// The words of word block kw (first word) of tiles w0 and w1, into the chains as fma_word
template <WKind KIND>
inline void fma_block(const uint32_t* w0, const uint32_t* w1, int64_t kw, const float* x, __m256* a0, __m256* a1) {
  if constexpr (KIND == WKind::Int3) {
    const __m256i ones = _mm256_set1_epi32(-1);
    const __m256i l00 = load_tile_word(w0, kw), l01 = load_tile_word(w0, kw + 1);
    const __m256i l10 = load_tile_word(w1, kw), l11 = load_tile_word(w1, kw + 1);
    const __m256i h0 = _mm256_xor_si256(load_tile_word(w0, kw + 2), ones);
    const __m256i h1 = _mm256_xor_si256(load_tile_word(w1, kw + 2), ones);
    auto step = [&](auto ic) {
      constexpr int I = decltype(ic)::value;
      const __m256 xi = _mm256_set1_ps(x[I]);
      a0[I % 4] = _mm256_fmadd_ps(decode_int3_centred<I>(l00, l01, h0), xi, a0[I % 4]);
      a1[I % 4] = _mm256_fmadd_ps(decode_int3_centred<I>(l10, l11, h1), xi, a1[I % 4]);
    };
    unroll<32>(step);
  } else {
    fma_word<KIND>(load_tile_word(w0, kw), load_tile_word(w1, kw), x, a0, a1);
  }
}

// The 4 pairs of a stream group by group (they share each 256-byte run of its words), each pair's accumulators
// kept in y between groups (exact: the same float operations in the same order as one pass per pair).
template <WKind KIND>
void gemv_f32_t(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  constexpr int BC = block_cols(KIND), BW = block_words(KIND);
  for (int64_t ts = t0; ts < t1; ts += 2 * kStreamPairs)
    for (int64_t m = 0; m < X.M; ++m) {
      const float* x = X.x + m * W.Kp;
      for (int64_t g = 0; g < W.G; ++g) {
        if (m == 0) prefetch_scales(W, g, ts);
        for (int64_t t = ts; t < std::min(t1, ts + 2 * kStreamPairs); t += 2) {
          const uint32_t *w0 = W.tile_words(t), *w1 = W.tile_words(t + 1);
          float* yr = y + m * W.Np + t * 8;
          __m256 acc0 = _mm256_loadu_ps(yr), acc1 = _mm256_loadu_ps(yr + 8);
          const int64_t kw0 = W.group_word_begin(g), kw1 = W.group_word_end(g);
          __m256 c0[4], c1[4];
          for (int c = 0; c < 4; ++c) c0[c] = c1[c] = _mm256_setzero_ps();
          const bool lead = m == 0 && t == ts;  // the first pass over this group's words of the stream
          const uint32_t* stream = stream_words(W, t);
          for (int64_t kw = kw0; kw < kw1; kw += BW) {
            if (lead)
              for (int i = 0; i < BW; ++i) prefetch_run(stream, kw + i);
            fma_block<KIND>(w0, w1, kw, x + kw / BW * BC, c0, c1);
          }
          __m256 a0 = c0[0], a1 = c1[0];
          for (int c = 1; c < 4; ++c) {
            a0 = _mm256_add_ps(a0, c0[c]);
            a1 = _mm256_add_ps(a1, c1[c]);
          }
          const __m256 s0 = scale_row8(W, g, t * 8), s1 = scale_row8(W, g, t * 8 + 8);
          acc0 = _mm256_fmadd_ps(a0, s0, acc0);
          acc1 = _mm256_fmadd_ps(a1, s1, acc1);
          if (KIND != WKind::Fp8 && W.zs) {  // symmetric weights: (z - offset) * s = 0, no term
            const float* zs = W.zs + g * W.Np + t * 8;
            const __m256 xsum = _mm256_set1_ps(X.xsum[m * W.G + g]);
            const __m256 off = _mm256_set1_ps(code_offset(KIND));
            const __m256 z0 = _mm256_fnmadd_ps(off, s0, _mm256_loadu_ps(zs));  // (z - offset) * s
            const __m256 z1 = _mm256_fnmadd_ps(off, s1, _mm256_loadu_ps(zs + 8));
            acc0 = _mm256_fnmadd_ps(z0, xsum, acc0);
            acc1 = _mm256_fnmadd_ps(z1, xsum, acc1);
          }
          _mm256_storeu_ps(yr, acc0);
          _mm256_storeu_ps(yr + 8, acc1);
        }
      }
    }
}

}  // namespace

void avx2_gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  switch (W.kind) {
    case WKind::Int4:
      return gemv_f32_t<WKind::Int4>(W, X, y, t0, t1);
    case WKind::Int8:
      return gemv_f32_t<WKind::Int8>(W, X, y, t0, t1);
    case WKind::Fp8:
      return gemv_f32_t<WKind::Fp8>(W, X, y, t0, t1);
    case WKind::Int2:
      return gemv_f32_t<WKind::Int2>(W, X, y, t0, t1);
    case WKind::Int3:
      return gemv_f32_t<WKind::Int3>(W, X, y, t0, t1);
  }
}

// ---- blocked GEMM -------------------------------------------------------------------------------------------

namespace {

template <WKind KIND>
void dequant_panel_t(const Weights& W, int64_t t, int64_t k0, int64_t kc, float* B) {
  constexpr int KPW = block_cols(KIND), BW = block_words(KIND);  // columns and words of a word block
  const uint32_t *w0 = W.tile_words(t), *w1 = W.tile_words(t + 1);
  int64_t g_cur = -1;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, z0 = s0, z1 = s0;
  for (int64_t kb = k0 / KPW; kb < (k0 + kc) / KPW; ++kb) {
    const int64_t kw = kb * BW, g = W.group_of(kb * KPW);
    if (g != g_cur) {
      g_cur = g;
      s0 = scale_row8(W, g, t * 8);
      s1 = scale_row8(W, g, t * 8 + 8);
      if constexpr (KIND != WKind::Fp8) {
        z0 = zs_row8(W, g, t * 8);
        z1 = zs_row8(W, g, t * 8 + 8);
      }
    }
    const __m256i v0 = load_tile_word(w0, kw), v1 = load_tile_word(w1, kw);
    __m256i v01 = v0, v11 = v1, h0 = v0, h1 = v1;  // int3: the second low word and the high word
    if constexpr (KIND == WKind::Int3) {
      v01 = load_tile_word(w0, kw + 1), v11 = load_tile_word(w1, kw + 1);
      h0 = load_tile_word(w0, kw + 2), h1 = load_tile_word(w1, kw + 2);
    }
    float* b = B + (kb * KPW - k0) * 16;
    auto step = [&](auto ic) {
      constexpr int I = decltype(ic)::value;
      if constexpr (KIND == WKind::Int3) {
        _mm256_storeu_ps(b + I * 16, _mm256_fmsub_ps(decode_int3<I>(v0, v01, h0), s0, z0));
        _mm256_storeu_ps(b + I * 16 + 8, _mm256_fmsub_ps(decode_int3<I>(v1, v11, h1), s1, z1));
      } else if constexpr (KIND == WKind::Fp8) {
        _mm256_storeu_ps(b + I * 16, _mm256_mul_ps(decode<KIND, I>(v0), s0));
        _mm256_storeu_ps(b + I * 16 + 8, _mm256_mul_ps(decode<KIND, I>(v1), s1));
      } else {
        _mm256_storeu_ps(b + I * 16, _mm256_fmsub_ps(decode<KIND, I>(v0), s0, z0));
        _mm256_storeu_ps(b + I * 16 + 8, _mm256_fmsub_ps(decode<KIND, I>(v1), s1, z1));
      }
    };
    unroll<KPW>(step);
  }
}

// y[MR][16] += x[MR][kc] * B[kc][16], the panel's products summed on their own first (blocked summation: the
// rounding error grows with kc, not with K)
template <int MR>
void ukernel(const float* B, int64_t kc, const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m256 c[MR][2];
  for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * 16), b1 = _mm256_loadu_ps(B + k * 16 + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(_mm256_loadu_ps(y + r * ldy), c[r][0]));
    _mm256_storeu_ps(y + r * ldy + 8, _mm256_add_ps(_mm256_loadu_ps(y + r * ldy + 8), c[r][1]));
  }
}

}  // namespace

void avx2_dequant_panel(const Weights& W, int64_t t, int64_t k0, int64_t kc, float* B) {
  switch (W.kind) {
    case WKind::Int4:
      return dequant_panel_t<WKind::Int4>(W, t, k0, kc, B);
    case WKind::Int8:
      return dequant_panel_t<WKind::Int8>(W, t, k0, kc, B);
    case WKind::Fp8:
      return dequant_panel_t<WKind::Fp8>(W, t, k0, kc, B);
    case WKind::Int2:
      return dequant_panel_t<WKind::Int2>(W, t, k0, kc, B);
    case WKind::Int3:
      return dequant_panel_t<WKind::Int3>(W, t, k0, kc, B);
  }
}

void avx2_gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  alignas(64) float B[kGemmKc * 16];
  for (int64_t k0 = 0; k0 < W.Kp; k0 += kGemmKc) {
    const int64_t kc = std::min(kGemmKc, W.Kp - k0);
    for (int64_t t = t0; t < t1; t += 2) {
      avx2_dequant_panel(W, t, k0, kc, B);
      for (int64_t m0 = 0; m0 < X.M; m0 += 6) {
        const float* x = X.x + m0 * W.Kp + k0;
        float* yt = y + m0 * W.Np + t * 8;
        switch (std::min<int64_t>(6, X.M - m0)) {
          case 6: ukernel<6>(B, kc, x, W.Kp, yt, W.Np); break;
          case 5: ukernel<5>(B, kc, x, W.Kp, yt, W.Np); break;
          case 4: ukernel<4>(B, kc, x, W.Kp, yt, W.Np); break;
          case 3: ukernel<3>(B, kc, x, W.Kp, yt, W.Np); break;
          case 2: ukernel<2>(B, kc, x, W.Kp, yt, W.Np); break;
          default: ukernel<1>(B, kc, x, W.Kp, yt, W.Np); break;
        }
      }
    }
  }
}

}  // namespace compressor

#endif
