// AVX-512 kernels for int weights x int8 activations (compiled with the AVX-512 flags, see kernels_avx512.cpp): the
// GEMV over tile pairs with VNNI chains (q8_pairs, any M; int2 / int3 at every M) and, without AMX, the
// register-blocked GEMM for int4 / int8 at M >= 16 (q8_rows). Exact int32 block sums, bit-identical to the scalar
// reference.
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>

#include "avx512_decode.h"
#include "kernels_avx512.h"

namespace compressor {
namespace {

// y -= sum over groups of tg * z * s, for every row, after all blocks (as in q8_pairs)
template <int P>
void zero_point_terms(const Weights& W, const QuantAct& A, float* y, int64_t t) {
  if (!W.zero_terms()) return;
  for (int64_t m = 0; m < A.M; ++m) {
    float* yr = y + m * W.Np + t * 8;
    __m512 acc[P];
    for (int p = 0; p < P; ++p) acc[p] = _mm512_loadu_ps(yr + 16 * p);
    for (int64_t g = 0; g < W.G; ++g) {
      const __m512 tg = _mm512_set1_ps(A.tg[m * W.G + g]);
      for (int p = 0; p < P; ++p) acc[p] = _mm512_fnmadd_ps(avx512_zs_row(W, g, t * 8 + 16 * p), tg, acc[p]);
    }
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(yr + 16 * p, acc[p]);
  }
}

// Two-level prefetch, taken by the decode GEMV (M = 1) on Intel CPUs: each line of the stream is requested into
// L2 kFarWords ahead (prefetcht2) and into L1 kNearWords ahead (prefetcht0), instead of once into L1
// kPrefetchWords ahead. On a 2-core Xeon (Emerald Rapids, 2026-12-06) the cache-cold int4 GEMV read 73-81% of the
// probe's bandwidth with the one-level prefetch and 84-97% with this (3 alternating processes of each build, all
// four benchmark shapes; docs/kernels.md, "Xeon with AMX"); with the weights in the L3 it costs 0-8%. The AMD
// machines keep the one-level prefetch: it had reached 86-107% there, and the hot L3-resident call, with the
// thinner margin, was tuned for it (not re-measured).
constexpr int64_t kNearWords = 8, kFarWords = 64;

template <bool TWO_LEVEL>
inline void prefetch_stream(const uint32_t* pair, int64_t kw) {
  if constexpr (TWO_LEVEL) {
    _mm_prefetch(reinterpret_cast<const char*>(pair + (kw + kNearWords) * kPairWordStride), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(pair + (kw + kFarWords) * kPairWordStride), _MM_HINT_T2);
  } else {
    prefetch_ahead(pair, kw);
  }
}

// (lo & lo_mask) | (hi & hi_mask) in two instructions (the second a vpternlogd: A | (B & C))
inline __m512i merge_bits(__m512i lo, __m512i lo_mask, __m512i hi, __m512i hi_mask) {
  return _mm512_ternarylogic_epi32(_mm512_and_si512(lo, lo_mask), hi, hi_mask, 0xF8);
}

// The int8 dot products of one int3 low word (16 columns) and its high bits: h has the high bits of codes r = 0, 1,
// 2 at bits 2, 4, 6 of each byte, h3 those of r = 3 at bit 6; u into c1, 4u into c4, 16u into c16. q: the 16
// activations of the word (ActPerm::Int2: code r of the 4 bytes at 4r .. 4r + 3).
inline void int3_dot_word(__m512i& c1, __m512i& c4, __m512i& c16, __m512i low, __m512i h, __m512i h3,
                          const int8_t* q) {
  const __m512i m40 = _mm512_set1_epi8(0x40), m30 = _mm512_set1_epi8(0x30);
  c1 = avx512_dpbusd(c1, merge_bits(low, _mm512_set1_epi8(0x03), h, _mm512_set1_epi8(0x04)),
                     _mm512_set1_epi32(load_i32(q)));
  c4 = avx512_dpbusd(c4, merge_bits(low, _mm512_set1_epi8(0x0C), h, _mm512_set1_epi8(0x10)),
                     _mm512_set1_epi32(load_i32(q + 4)));
  c16 = avx512_dpbusd(c16, merge_bits(low, m30, h, m40), _mm512_set1_epi32(load_i32(q + 8)));
  c16 = avx512_dpbusd(c16, merge_bits(_mm512_srli_epi32(low, 2), m30, h3, m40), _mm512_set1_epi32(load_i32(q + 12)));
}

// P tile pairs (16 P weight rows) against every activation row, one activation block at a time: each block's
// weights (P KiB for a 128-column int4 block) stay in L1 while the M rows use them, the P pairs give 2P
// independent VNNI chains (the latency of one chain, not the load bandwidth, bounded the one-pair loop), and the
// broadcast activations are shared by the P pairs. Float accumulators live in y (zero-initialised), or in
// registers at M = 1. P = 4: the 4 pairs of a weight stream, one 256-byte run per step.
template <WKind KIND, int P, bool TWO_LEVEL>
void q8_pairs(const Weights& W, const QuantAct& A, float* y, int64_t t) {
  const uint32_t* w[P];
  for (int p = 0; p < P; ++p) w[p] = W.pair_words(t / 2 + p);
  const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // Blocks never straddle groups: the group index advances every `per_group` blocks (counted, not divided: three
  // 64-bit divisions per block sat on the path between one block's dot products and the next's).
  const int64_t per_group = W.G == 1 ? A.NB : W.group / A.ablk;
  // M = 1 (decode): y's 16 P rows stay in registers across blocks instead of a load and a store per block.
  const bool one_row = A.M == 1;
  __m512 acc[P];
  for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
  for (int64_t b = 0, g = 0, in_group = 0; b < A.NB; ++b) {
    const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
    // The weight stream is prefetched kPrefetchWords words ahead (the hardware prefetcher restarts at every 4 KiB
    // page); the next group's scales and this group's z * s rows (read at the end) are strided lines it would not
    // find either.
    if (in_group == 0)
      for (int p = 0; p < P; ++p) {
        if (g + 1 < W.G) _mm_prefetch(W.scale_addr(g + 1, t * 8 + 16 * p), _MM_HINT_T0);
        if (W.zs) _mm_prefetch(reinterpret_cast<const char*>(W.zs + g * W.Np + (t + 2 * p) * 8), _MM_HINT_T0);
      }
    // this block's scales, widened once into L1 (converting 16-bit ones in the epilogue below cost the dot-product
    // loop its register allocation: GCC copied 4 of the 8 accumulators per step again)
    alignas(64) float srow[16 * P];
    for (int p = 0; p < P; ++p) _mm512_store_ps(srow + 16 * p, avx512_scale_row(W, g, t * 8 + 16 * p));
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* q = A.q + m * A.ldq;
      __m512i i0[P], i1[P];
      for (int p = 0; p < P; ++p) i0[p] = i1[p] = _mm512_setzero_si512();
      if constexpr (KIND == WKind::Int4) {
        // high nibbles taken in place (v & 0xF0 = 16 u): one op per vector less than shift-and-mask; the sums
        // of 16 u x are exact in int32 (|.| <= 64 * 240 * 127 per block) and shifted back below
        for (int64_t kw = k0 / 8; kw < k1 / 8; ++kw) {
          const __m512i xe = _mm512_set1_epi32(load_i32(q + kw * 8)), xo = _mm512_set1_epi32(load_i32(q + kw * 8 + 4));
          if (m == 0)
            for (int p = 0; p < P; ++p)
              prefetch_stream<TWO_LEVEL>(w[p], kw);
          for (int p = 0; p < P; ++p) {
            const __m512i v = avx512_load_pair(w[p], kw);
            i0[p] = avx512_dpbusd(i0[p], _mm512_and_si512(v, low), xe);
            i1[p] = avx512_dpbusd(i1[p], _mm512_andnot_si512(low, v), xo);
          }
        }
        const __m512i off = _mm512_set1_epi32(W.fold_offset() * A.qsum[m * A.NB + b]);
        for (int p = 0; p < P; ++p) i1[p] = _mm512_sub_epi32(_mm512_srai_epi32(i1[p], 4), off);
      } else if constexpr (KIND == WKind::Int2) {
        // code 4j + r of a word is byte j of: (v & 0x03) for r = 0, (v >> 4) & 0x03 for r = 2, and in place as 4u
        // (& 0x0C) for r = 1, 3, whose chain's exact sum is shifted back below. The activations of code r are
        // positions 4r .. 4r + 3 of the word's 16 (ActPerm::Int2).
        const __m512i m03 = _mm512_set1_epi8(0x03), m0c = _mm512_set1_epi8(0x0C);
        for (int64_t kw = k0 / 16; kw < k1 / 16; ++kw) {
          const int8_t* qk = q + kw * 16;
          const __m512i x0 = _mm512_set1_epi32(load_i32(qk)), x1 = _mm512_set1_epi32(load_i32(qk + 4));
          const __m512i x2 = _mm512_set1_epi32(load_i32(qk + 8)), x3 = _mm512_set1_epi32(load_i32(qk + 12));
          if (m == 0)
            for (int p = 0; p < P; ++p) prefetch_stream<TWO_LEVEL>(w[p], kw);
          for (int p = 0; p < P; ++p) {
            const __m512i v = avx512_load_pair(w[p], kw), v4 = _mm512_srli_epi32(v, 4);
            i0[p] = avx512_dpbusd(i0[p], _mm512_and_si512(v, m03), x0);
            i1[p] = avx512_dpbusd(i1[p], _mm512_and_si512(v, m0c), x1);
            i0[p] = avx512_dpbusd(i0[p], _mm512_and_si512(v4, m03), x2);
            i1[p] = avx512_dpbusd(i1[p], _mm512_and_si512(v4, m0c), x3);
          }
        }
        const __m512i off = _mm512_set1_epi32(W.fold_offset() * A.qsum[m * A.NB + b]);
        for (int p = 0; p < P; ++p) i1[p] = _mm512_sub_epi32(_mm512_srai_epi32(i1[p], 2), off);
      } else if constexpr (KIND == WKind::Int3) {
        // 32 columns per block of 3 words. Column 16w + 4j + r is byte j of a code vector made of low word w and the
        // high word h (int3_high_bit): u for r = 0, 4u for r = 1, 16u for r = 2, 3 (low bits in place, r = 3 from
        // low >> 2; the high bit next to them from h, h >> 1, h << 6 or h << 5), one chain per scale, shifted back
        // below (the sums are exact multiples).
        __m512i i2[P];
        for (int p = 0; p < P; ++p) i2[p] = _mm512_setzero_si512();
        for (int64_t kb = k0 / 32; kb < k1 / 32; ++kb) {
          const int8_t* qk = q + kb * 32;
          if (m == 0)
            for (int p = 0; p < P; ++p)
              for (int i = 0; i < 3; ++i) prefetch_stream<TWO_LEVEL>(w[p], 3 * kb + i);
          for (int p = 0; p < P; ++p) {
            const __m512i l0 = avx512_load_pair(w[p], 3 * kb), l1 = avx512_load_pair(w[p], 3 * kb + 1);
            const __m512i h = avx512_load_pair(w[p], 3 * kb + 2), h1 = _mm512_srli_epi32(h, 1);
            int3_dot_word(i0[p], i1[p], i2[p], l0, h, _mm512_slli_epi32(h, 6), qk);
            int3_dot_word(i0[p], i1[p], i2[p], l1, h1, _mm512_slli_epi32(h, 5), qk + 16);
          }
        }
        const __m512i off = _mm512_set1_epi32(W.fold_offset() * A.qsum[m * A.NB + b]);
        for (int p = 0; p < P; ++p)
          i1[p] = _mm512_sub_epi32(_mm512_add_epi32(_mm512_srai_epi32(i1[p], 2), _mm512_srai_epi32(i2[p], 4)), off);
      } else {
        // q + 128 as the unsigned operand; 128 * sum(x) subtracted afterwards (exact in int32). A block has an
        // even number of words (blocks and Kp are multiples of 32 columns).
        for (int64_t kw = k0 / 4; kw < k1 / 4; kw += 2) {
          const __m512i x0 = _mm512_set1_epi32(load_i32(q + kw * 4)), x1 = _mm512_set1_epi32(load_i32(q + kw * 4 + 4));
          if (m == 0)
            for (int p = 0; p < P; ++p) {
              prefetch_stream<TWO_LEVEL>(w[p], kw);
              prefetch_stream<TWO_LEVEL>(w[p], kw + 1);
            }
          for (int p = 0; p < P; ++p) {
            i0[p] = avx512_dpbusd(i0[p], _mm512_xor_si512(avx512_load_pair(w[p], kw), flip), x0);
            i1[p] = avx512_dpbusd(i1[p], _mm512_xor_si512(avx512_load_pair(w[p], kw + 1), flip), x1);
          }
        }
        const __m512i corr = _mm512_set1_epi32(128 * A.qsum[m * A.NB + b]);
        for (int p = 0; p < P; ++p) i0[p] = _mm512_sub_epi32(i0[p], corr);
      }
      float* yr = y + m * W.Np + t * 8;
      const __m512 xs = _mm512_set1_ps(A.xs[m * A.NB + b]);
      for (int p = 0; p < P; ++p) {
        const __m512 sc = _mm512_mul_ps(_mm512_load_ps(srow + 16 * p), xs);
        const __m512 i = _mm512_cvtepi32_ps(_mm512_add_epi32(i0[p], i1[p]));
        if (one_row)
          acc[p] = _mm512_fmadd_ps(i, sc, acc[p]);
        else
          _mm512_storeu_ps(yr + 16 * p, _mm512_fmadd_ps(i, sc, _mm512_loadu_ps(yr + 16 * p)));
      }
    }
    if (++in_group == per_group) {
      in_group = 0;
      g = std::min(g + 1, W.G - 1);
    }
  }
  if (one_row)
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(y + t * 8 + 16 * p, acc[p]);
  zero_point_terms<P>(W, A, y, t);
}


template <WKind KIND>
void gemv_q8_t(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  int64_t t = t0;
  if (A.M == 1 && cpu_is_intel())
    for (; t < t1; t += 8) q8_pairs<KIND, 4, true>(W, A, y, t);
  else
    for (; t < t1; t += 8) q8_pairs<KIND, 4, false>(W, A, y, t);
}

}  // namespace

void avx512_gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  switch (W.kind) {
    case WKind::Int4: return gemv_q8_t<WKind::Int4>(W, A, y, t0, t1);
    case WKind::Int2: return gemv_q8_t<WKind::Int2>(W, A, y, t0, t1);
    case WKind::Int3: return gemv_q8_t<WKind::Int3>(W, A, y, t0, t1);
    default: return gemv_q8_t<WKind::Int8>(W, A, y, t0, t1);
  }
}

// ---- int8-activation GEMM (M >= 16) without AMX ----------------------------------------------------------------

namespace {

// R activation rows x P tile pairs over activation blocks [b0, b1): each weight vector is loaded (and its nibbles
// split) once for the R rows, and both halves of a word go to one int32 accumulator per (row, pair) -- the same
// exact integer block sums as q8_pairs, so y gets the same float updates in the same order. Registers: R*P
// accumulators + 2P weight vectors + 2 broadcasts (27 of 32 at R = P = 4).
template <WKind KIND, int R, int P>
void q8_rows(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t m0, int64_t b0, int64_t b1) {
  const uint32_t* w[P];
  for (int p = 0; p < P; ++p) w[p] = W.pair_words(t / 2 + p);
  const int8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = A.q + (m0 + r) * A.ldq;
  const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
    __m512i acc[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
    if constexpr (KIND == WKind::Int4) {
      for (int64_t kw = k0 / 8; kw < k1 / 8; ++kw) {
        __m512i lo[P], hi[P];
        for (int p = 0; p < P; ++p) {
          const __m512i v = avx512_load_pair(w[p], kw);
          lo[p] = _mm512_and_si512(v, low);
          hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i xe = _mm512_set1_epi32(load_i32(q[r] + kw * 8));
          const __m512i xo = _mm512_set1_epi32(load_i32(q[r] + kw * 8 + 4));
          for (int p = 0; p < P; ++p) acc[r][p] = avx512_dpbusd(avx512_dpbusd(acc[r][p], lo[p], xe), hi[p], xo);
        }
      }
      if (const int32_t fold = W.fold_offset())
        for (int r = 0; r < R; ++r) {
          const __m512i off = _mm512_set1_epi32(fold * A.qsum[(m0 + r) * A.NB + b]);
          for (int p = 0; p < P; ++p) acc[r][p] = _mm512_sub_epi32(acc[r][p], off);
        }
    } else {
      for (int64_t kw = k0 / 4; kw < k1 / 4; kw += 2) {  // q + 128 unsigned, 128 * sum(x) subtracted below
        __m512i v0[P], v1[P];
        for (int p = 0; p < P; ++p) {
          v0[p] = _mm512_xor_si512(avx512_load_pair(w[p], kw), flip);
          v1[p] = _mm512_xor_si512(avx512_load_pair(w[p], kw + 1), flip);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i x0 = _mm512_set1_epi32(load_i32(q[r] + kw * 4));
          const __m512i x1 = _mm512_set1_epi32(load_i32(q[r] + kw * 4 + 4));
          for (int p = 0; p < P; ++p) acc[r][p] = avx512_dpbusd(avx512_dpbusd(acc[r][p], v0[p], x0), v1[p], x1);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i corr = _mm512_set1_epi32(128 * A.qsum[(m0 + r) * A.NB + b]);
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_sub_epi32(acc[r][p], corr);
      }
    }
    const int64_t g = W.group_of(k0);
    __m512 srow[P];
    for (int p = 0; p < P; ++p) srow[p] = avx512_scale_row(W, g, t * 8 + 16 * p);
    for (int r = 0; r < R; ++r) {
      float* yr = y + (m0 + r) * W.Np + t * 8;
      const __m512 xs = _mm512_set1_ps(A.xs[(m0 + r) * A.NB + b]);
      for (int p = 0; p < P; ++p) {
        const __m512 sc = _mm512_mul_ps(srow[p], xs);
        _mm512_storeu_ps(yr + 16 * p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][p]), sc, _mm512_loadu_ps(yr + 16 * p)));
      }
    }
  }
}

template <WKind KIND, int P>
void q8_row_tiles(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t b0, int64_t b1) {
  int64_t m = 0;
  for (; m + 4 <= A.M; m += 4) q8_rows<KIND, 4, P>(W, A, y, t, m, b0, b1);
  switch (A.M - m) {
    case 3: q8_rows<KIND, 3, P>(W, A, y, t, m, b0, b1); break;
    case 2: q8_rows<KIND, 2, P>(W, A, y, t, m, b0, b1); break;
    case 1: q8_rows<KIND, 1, P>(W, A, y, t, m, b0, b1); break;
    default: break;
  }
}

// Activation blocks in chunks whose int8 rows (M x chunk bytes) stay in L2 while every tile of [t0, t1) uses them;
// a tile group's weights for one chunk (64 rows x chunk/2 bytes for int4) stay in L1/L2 across the M/4 row steps.
constexpr int64_t kQ8ChunkBytes = 192 << 10;

template <WKind KIND>
void gemm_q8_t(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  const int64_t chunk = std::max<int64_t>(1, kQ8ChunkBytes / (A.M * A.ablk));
  for (int64_t b0 = 0; b0 < A.NB; b0 += chunk) {
    const int64_t b1 = std::min(A.NB, b0 + chunk);
    int64_t t = t0;
    for (; t < t1; t += 8) q8_row_tiles<KIND, 4>(W, A, y, t, b0, b1);
  }
  int64_t t = t0;
  for (; t < t1; t += 8) zero_point_terms<4>(W, A, y, t);
}

}  // namespace

// int2 / int3 at M >= 16 take the GEMV kernel, which runs any M (each block's weights stay in L1 while the rows
// use them; bit-identical by construction)
void avx512_gemm_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  if (is_low_bit(W.kind)) return avx512_gemv_q8(W, A, y, t0, t1);
  if (W.kind == WKind::Int4)
    gemm_q8_t<WKind::Int4>(W, A, y, t0, t1);
  else
    gemm_q8_t<WKind::Int8>(W, A, y, t0, t1);
}

}  // namespace compressor

#endif
