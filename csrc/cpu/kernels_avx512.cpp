// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bf16 -mavx2 -mfma; chosen at
// run time only when the CPU and OS support AVX-512F/BW/VL and VNNI). A 512-bit vector holds two 8-row tiles.
// The int8-activation GEMV uses VNNI (vpdpbusd: u8 x s8 -> s32, no int16 saturation); the GEMM uses a 12x16
// register tile. Results are bit-identical to the scalar reference (integer sums are exact, float ops in the
// same order).
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels_avx2.h"
#include "kernels_avx512.h"

namespace compressor {
namespace {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

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

// P tile pairs (16 P weight rows) against every activation row, one activation block at a time: each block's
// weights (P KiB for a 128-column int4 block) stay in L1 while the M rows use them, the P pairs give 2P
// independent VNNI chains (the latency of one chain, not the load bandwidth, bounded the one-pair loop), and the
// broadcast activations are shared by the P pairs. Float accumulators live in y (zero-initialised), or in
// registers at M = 1. P = 4: the 4 pairs of a weight stream, one 256-byte run per step.
// Prefetch of word kw + kPrefetchWords of a pair (one 64-byte line; the 4 pairs' lines of a word are one 256-byte
// run of the stream)
inline void prefetch_ahead(const uint32_t* pair, int64_t kw) {
  _mm_prefetch(reinterpret_cast<const char*>(pair + (kw + kPrefetchWords) * kPairWordStride), _MM_HINT_T0);
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

// ---- int8-activation GEMM (M >= 16) without AMX ----------------------------------------------------------------

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

template <WKind KIND>
void gemv_q8_t(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  int64_t t = t0;
  if (A.M == 1 && cpu_is_intel())
    for (; t < t1; t += 8) q8_pairs<KIND, 4, true>(W, A, y, t);
  else
    for (; t < t1; t += 8) q8_pairs<KIND, 4, false>(W, A, y, t);
}

void gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  switch (W.kind) {
    case WKind::Int4: return gemv_q8_t<WKind::Int4>(W, A, y, t0, t1);
    case WKind::Int2: return gemv_q8_t<WKind::Int2>(W, A, y, t0, t1);
    case WKind::Int3: return gemv_q8_t<WKind::Int3>(W, A, y, t0, t1);
    default: return gemv_q8_t<WKind::Int8>(W, A, y, t0, t1);
  }
}

// int2 / int3 at M >= 16 take the GEMV kernel, which runs any M (each block's weights stay in L1 while the rows
// use them; bit-identical by construction)
void gemm_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  if (is_low_bit(W.kind)) return gemv_q8(W, A, y, t0, t1);
  if (W.kind == WKind::Int4)
    gemm_q8_t<WKind::Int4>(W, A, y, t0, t1);
  else
    gemm_q8_t<WKind::Int8>(W, A, y, t0, t1);
}

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

void gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  if (W.kind == WKind::Int4) return int_gemv_f32<WKind::Int4>(W, X, y, t0, t1);
  if (W.kind == WKind::Int8) return int_gemv_f32<WKind::Int8>(W, X, y, t0, t1);
  if (W.kind == WKind::Int2) return int_gemv_f32<WKind::Int2>(W, X, y, t0, t1);
  if (W.kind == WKind::Int3) return int_gemv_f32<WKind::Int3>(W, X, y, t0, t1);
  int64_t t = t0;
  for (; t < t1; t += 8) fp8_pairs<4>(W, X, y, t);
}

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

const KernelTable kTable{"avx512", gemv_q8, gemm_q8, gemv_f32, gemm_f32, quantize, read};

}  // namespace

const KernelTable* avx512_kernels() { return &kTable; }

}  // namespace compressor

#else

namespace compressor {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace compressor

#endif
