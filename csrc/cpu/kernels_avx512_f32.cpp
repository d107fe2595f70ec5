// AVX-512 kernels for int / fp8 weights x float activations (compiled with the AVX-512 flags, see
// kernels_avx512.cpp): the GEMV over tile pairs in the scalar reference's chain order (FP8 and INT decoders), and the
// blocked GEMM on the AVX2 dequantized panel (avx2_dequant_panel) with a 12 x 16 register tile.
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "avx512_decode.h"
#include "kernels_avx2.h"
#include "kernels_avx512.h"

namespace compressor {
namespace {

// ---- FP8 x float activations ---------------------------------------------------------------------------------

// 64 E4M3 bytes (16 rows x 4 columns, as load_pair returns them) -> four vectors of 16 floats, each the exact
// E4M3 value times 2^-8: the byte placed in the high half of a 16-bit lane and shifted right arithmetically by one
// is the binary16 pattern of that value (sign at bit 15, exponent and mantissa at bits 7..13, subnormals included),
// and vcvtph2ps widens it exactly. Lane order: 4 rows x 4 columns per vector, rows kFp8Rows[j].
constexpr int kFp8Rows[4][4] = {{0, 1, 4, 5}, {8, 9, 12, 13}, {2, 3, 6, 7}, {10, 11, 14, 15}};

inline void decode_fp8(__m512i v, __m512 f[4]) {
  const __m512i zero = _mm512_setzero_si512(), bits = _mm512_set1_epi16(static_cast<short>(0xBF80));
  const __m512i lo = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpacklo_epi8(zero, v), 1), bits);
  const __m512i hi = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpackhi_epi8(zero, v), 1), bits);
  f[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(lo));
  f[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1));
  f[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(hi));
  f[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1));
}

// P tile pairs, one activation row at a time. Lane (row, c) of the accumulators is the scalar reference's chain
// c = k % 4 of that row; the activations are scaled by 2^8 so that each product equals the reference's exactly
// (fma rounds the exact product once), and the chains are summed in the reference's order at each group's end.
template <int P>
void fp8_pairs(const Weights& W, const FloatAct& X, float* y, int64_t t) {
  const uint32_t* w[P];
  for (int p = 0; p < P; ++p) w[p] = W.pair_words(t / 2 + p);
  const __m512 two8 = _mm512_set1_ps(256.f);
  for (int64_t m = 0; m < X.M; ++m) {
    const float* x = X.x + m * W.Kp;
    float acc[P][16] = {};
    for (int64_t g = 0; g < W.G; ++g) {
      const int64_t kw0 = W.group_word_begin(g), kw1 = W.group_word_end(g);
      __m512 c[P][4];
      for (int p = 0; p < P; ++p)
        for (int j = 0; j < 4; ++j) c[p][j] = _mm512_setzero_ps();
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const __m512 xv = _mm512_mul_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(x + kw * 4)), two8);
        for (int p = 0; p < P; ++p) {
          __m512 f[4];
          decode_fp8(avx512_load_pair(w[p], kw), f);
          for (int j = 0; j < 4; ++j) c[p][j] = _mm512_fmadd_ps(f[j], xv, c[p][j]);
        }
      }
      for (int p = 0; p < P; ++p) {
        alignas(64) float lanes[4][16];
        for (int j = 0; j < 4; ++j) _mm512_store_ps(lanes[j], c[p][j]);
        alignas(64) float s[16];
        _mm512_store_ps(s, avx512_scale_row(W, g, (t + 2 * p) * 8));
        for (int j = 0; j < 4; ++j)
          for (int r = 0; r < 4; ++r) {
            const float* ch = lanes[j] + 4 * r;
            const int row = kFp8Rows[j][r];
            acc[p][row] = std::fmaf(((ch[0] + ch[1]) + ch[2]) + ch[3], s[row], acc[p][row]);
          }
      }
    }
    for (int p = 0; p < P; ++p) std::memcpy(y + m * W.Np + (t + 2 * p) * 8, acc[p], sizeof acc[p]);
  }
}

// ---- INT x float activations ---------------------------------------------------------------------------------

// Code I of each of the 16 rows of a pair word as float: int4 centred (u - 8; the word XOR 0x88888888 makes each
// nibble the signed 4-bit u - 8), int8 the signed byte.
template <WKind KIND, int I>
inline __m512 decode_centred(__m512i v) {
  constexpr int kBits = KIND == WKind::Int4 ? 4 : 8;
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 32 - kBits * (I + 1)), 32 - kBits));
}

// Centred int2 codes by table lookup (vpermps reads the low 4 bits of each lane): table `lo` gives the code in
// bits 0-1 as u - 2, `hi` the one in bits 2-3; one shift of the word serves two codes. 3 instructions per code with
// the FMA instead of 4 (shift, arithmetic shift, convert).
struct Int2Tables {
  __m512 lo = _mm512_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1);
  __m512 hi = _mm512_setr_ps(-2, -2, -2, -2, -1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1);
};

template <int I>
inline __m512 decode_int2_centred(__m512i v, const Int2Tables& t) {
  const __m512i idx = I >= 2 ? _mm512_srli_epi32(v, 2 * (I & ~1)) : v;
  return _mm512_permutexvar_ps(idx, I & 1 ? t.hi : t.lo);
}

// Centred int3 codes by a 32-entry lookup (vpermt2ps: index bits 0-3 pick a lane, bit 4 the table): the low
// bits of column I from its low word shifted (one shift serves two columns, as for int2), its high bit merged in
// at bit 4 from the high word shifted (vpternlogd). 4.5 instructions per code with the FMA instead of 6.
struct Int3Tables {
  // code in bits 0-1 (even columns) / 2-3 (odd columns) of the index, high bit 0 / 1: u - 4
  __m512 even0 = _mm512_setr_ps(-4, -3, -2, -1, -4, -3, -2, -1, -4, -3, -2, -1, -4, -3, -2, -1);
  __m512 even1 = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  __m512 odd0 = _mm512_setr_ps(-4, -4, -4, -4, -3, -3, -3, -3, -2, -2, -2, -2, -1, -1, -1, -1);
  __m512 odd1 = _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512i bit4 = _mm512_set1_epi32(0x10);
};

template <int I>
inline __m512 decode_int3_centred(__m512i l0, __m512i l1, __m512i h, const Int3Tables& t) {
  constexpr int i = I % 16, bit = 8 * (i / 4) + int3_high_bit(I / 16, i % 4);
  const __m512i low = I < 16 ? l0 : l1;
  const __m512i ls = i >= 2 ? _mm512_srli_epi32(low, 2 * (i & ~1)) : low;
  __m512i hs = h;  // the high bit moved to bit 4
  if constexpr (bit > 4) hs = _mm512_srli_epi32(h, bit - 4);
  if constexpr (bit < 4) hs = _mm512_slli_epi32(h, 4 - bit);
  const __m512i idx = _mm512_ternarylogic_epi32(t.bit4, hs, ls, 0xCA);  // bit 4 from hs, the others from ls
  return i & 1 ? _mm512_permutex2var_ps(t.odd0, idx, t.odd1) : _mm512_permutex2var_ps(t.even0, idx, t.even1);
}

// P tile pairs, one activation row at a time, in the scalar reference's order: column k of a row goes to chain
// k % 4, the chains are summed ((0 + 1) + 2) + 3 at each group's end and folded in with one fma by the scale, then
// the zero-point term (z - offset) * s * sum(x) of asymmetric weights. Lane j of a vector is row j of its pair.
template <WKind KIND, int P>
void int_f32_pairs(const Weights& W, const FloatAct& X, float* y, int64_t t) {
  constexpr int BC = block_cols(KIND), BW = block_words(KIND);
  const uint32_t* w[P];
  for (int p = 0; p < P; ++p) w[p] = W.pair_words(t / 2 + p);
  const __m512i flip = _mm512_set1_epi32(KIND == WKind::Int4 ? static_cast<int>(0x88888888u) : 0);
  for (int64_t m = 0; m < X.M; ++m) {
    const float* x = X.x + m * W.Kp;
    __m512 acc[P];
    for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
    for (int64_t g = 0; g < W.G; ++g) {
      const int64_t kw0 = W.group_word_begin(g), kw1 = W.group_word_end(g);
      __m512 c[P][4];
      for (int p = 0; p < P; ++p)
        for (int j = 0; j < 4; ++j) c[p][j] = _mm512_setzero_ps();
      for (int64_t kw = kw0; kw < kw1; kw += BW) {
        if (m == 0)
          for (int p = 0; p < P; ++p)
            for (int i = 0; i < BW; ++i) prefetch_ahead(w[p], kw + i);
        const float* xk = x + kw / BW * BC;
        if constexpr (KIND == WKind::Int3) {
          const Int3Tables tables;
          __m512i l0[P], l1[P], h[P];
          for (int p = 0; p < P; ++p) {
            l0[p] = avx512_load_pair(w[p], kw);
            l1[p] = avx512_load_pair(w[p], kw + 1);
            h[p] = avx512_load_pair(w[p], kw + 2);
          }
          auto step = [&](auto ic) {
            constexpr int I = decltype(ic)::value;
            const __m512 xi = _mm512_set1_ps(xk[I]);
            for (int p = 0; p < P; ++p)
              c[p][I % 4] = _mm512_fmadd_ps(decode_int3_centred<I>(l0[p], l1[p], h[p], tables), xi, c[p][I % 4]);
          };
          unroll<BC>(step);
        } else if constexpr (KIND == WKind::Int2) {
          const Int2Tables tables;
          __m512i v[P];
          for (int p = 0; p < P; ++p) v[p] = avx512_load_pair(w[p], kw);
          auto step = [&](auto ic) {
            constexpr int I = decltype(ic)::value;
            const __m512 xi = _mm512_set1_ps(xk[I]);
            for (int p = 0; p < P; ++p)
              c[p][I % 4] = _mm512_fmadd_ps(decode_int2_centred<I>(v[p], tables), xi, c[p][I % 4]);
          };
          unroll<BC>(step);
        } else {
          __m512i v[P];
          for (int p = 0; p < P; ++p) v[p] = _mm512_xor_si512(avx512_load_pair(w[p], kw), flip);
          auto step = [&](auto ic) {
            constexpr int I = decltype(ic)::value;
            const __m512 xi = _mm512_set1_ps(xk[I]);
            for (int p = 0; p < P; ++p) c[p][I % 4] = _mm512_fmadd_ps(decode_centred<KIND, I>(v[p]), xi, c[p][I % 4]);
          };
          unroll<BC>(step);
        }
      }
      for (int p = 0; p < P; ++p) {
        const __m512 a = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c[p][0], c[p][1]), c[p][2]), c[p][3]);
        const int64_t col = (t + 2 * p) * 8;
        const __m512 sc = avx512_scale_row(W, g, col);
        acc[p] = _mm512_fmadd_ps(a, sc, acc[p]);
        if (W.zs) {  // symmetric weights: (z - offset) * s = 0, no term
          const __m512 z = _mm512_fnmadd_ps(_mm512_set1_ps(W.zoff), sc, _mm512_loadu_ps(W.zs + g * W.Np + col));
          acc[p] = _mm512_fnmadd_ps(z, _mm512_set1_ps(X.xsum[m * W.G + g]), acc[p]);
        }
      }
    }
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(y + m * W.Np + (t + 2 * p) * 8, acc[p]);
  }
}

template <WKind KIND>
void int_gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t < t1; t += 8) int_f32_pairs<KIND, 4>(W, X, y, t);
}

}  // namespace

void avx512_gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  if (W.kind == WKind::Int4) return int_gemv_f32<WKind::Int4>(W, X, y, t0, t1);
  if (W.kind == WKind::Int8) return int_gemv_f32<WKind::Int8>(W, X, y, t0, t1);
  if (W.kind == WKind::Int2) return int_gemv_f32<WKind::Int2>(W, X, y, t0, t1);
  if (W.kind == WKind::Int3) return int_gemv_f32<WKind::Int3>(W, X, y, t0, t1);
  int64_t t = t0;
  for (; t < t1; t += 8) fp8_pairs<4>(W, X, y, t);
}

// ---- blocked GEMM -------------------------------------------------------------------------------------------

namespace {

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

}  // namespace

void avx512_gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
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

}  // namespace compressor

#endif
