// AVX2 kernels for int weights x int8 activations (compiled with the AVX2 flags, see kernels_avx2.cpp): the
// small-M GEMV over whole weight streams (int2 / int3 "lowbit" streams included) and the tiled GEMM for M >= 16.
// vpmaddubsw int16 products (no VNNI) widened to int32 block sums; bit-identical to the scalar reference.
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>

#include "avx2_decode.h"

namespace compressor {
namespace {

// Optimisation barrier: stops GCC from reassociating the int16 sums into a tree of 32 live products (which spills
// them to the stack); the sums stay running accumulators in registers.
inline void keep_in_register(__m256i& v) { __asm__("" : "+x"(v)); }

// y -= sum over groups of tg * z * s for the 8 rows of tile t and activation row m (asymmetric weights), after
// every block of that row has been added (the scalar reference's order)
inline void zero_point_terms8(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t m) {
  float* yr = y + m * W.Np + t * 8;
  __m256 acc = _mm256_loadu_ps(yr);
  for (int64_t g = 0; g < W.G; ++g)
    acc = _mm256_fnmadd_ps(zs_row8(W, g, t * 8), _mm256_set1_ps(A.tg[m * W.G + g]), acc);
  _mm256_storeu_ps(yr, acc);
}

// y += (block sum) * s * xs for the 8 rows of tile t, activation row m, block b of group g: the one float update
// per block that every path makes in the same order
inline void add_block8(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t m, int64_t b, int64_t g,
                       __m256i isum) {
  float* yr = y + m * W.Np + t * 8;
  const __m256 sc = _mm256_mul_ps(scale_row8(W, g, t * 8), _mm256_set1_ps(A.xs[m * A.NB + b]));
  _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, _mm256_loadu_ps(yr)));
}

// Small M (decode): the 8 tiles of one weight stream (t, a multiple of 8) against every activation row, one
// activation block at a time, all 8 tiles per word: each 256-byte run of the stream is read whole and in order,
// and one activation broadcast pair serves the 8 tiles. The int4 path keeps 8 int16 chains in registers (widened
// every 4 words) and the int32 block sums in L1; int8 keeps 8 int32 chains. The block's weights (4 KiB for a
// 128-column int4 block) stay in L1 while the other rows use them. Zen 3, 2 threads:
//  - until 2026-12-05 the tiles went one at a time (one chain, a broadcast pair per tile and word): M=1
//    4096 x 4096 0.33-0.39 ms, 3.5x a plain read of its bytes;
//  - then two halves of 4 tiles (4 chains each, the second half from L1): 0.17 ms, but from DRAM it read at
//    0.63-0.73x the rate of a plain read (the demand stream took two lines of each run, then came back);
//  - whole runs: 0.88-0.94x (C++ harness rotating 256 MiB of 4096 x 14336 copies), and 9% faster from L2.
template <WKind KIND>
void q8_stream(const Weights& W, const QuantAct& A, float* y, int64_t t) {
  const uint32_t* stream = stream_words(W, t);  // word kw of tile t + j at stream + kw * kPairWordStride + 8 j
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  const int64_t per_group = W.G == 1 ? A.NB : W.group / A.ablk;  // blocks never straddle groups
  alignas(32) int32_t isum[8][8];
  int32_t(*isum_mem)[8] = isum;
  __asm__("" : "+r"(isum_mem));  // opaque to GCC: kept in L1, not promoted into registers (see q8_pair4)
  for (int64_t b = 0, g = 0, in_group = 0; b < A.NB; ++b) {
    const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
    const int64_t w0 = k0 / kpw<KIND>(), w1 = k1 / kpw<KIND>();
    if (in_group == 0) prefetch_scales(W, g, t);
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* q = A.q + m * A.ldq;
      __m256i i32[8];
      if constexpr (KIND == WKind::Int4) {
        for (int j = 0; j < 8; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(isum_mem[j]), _mm256_setzero_si256());
        // int16 sums of 4 words (|sum| <= 4 * 2 * 2 * 15 * 127 < 2^15); a block has a multiple of 4 words (blocks
        // and Kp are multiples of 32 columns)
        for (int64_t kw = w0; kw < w1; kw += 4) {
          __m256i s16[8];
          for (int j = 0; j < 8; ++j) s16[j] = _mm256_setzero_si256();
          for (int64_t u = kw; u < kw + 4; ++u) {
            if (m == 0) prefetch_run(stream, u);
            const __m256i xe = _mm256_set1_epi32(load_i32(q + u * 8)), xo = _mm256_set1_epi32(load_i32(q + u * 8 + 4));
            for (int j = 0; j < 8; ++j) {
              const __m256i v = load_tile_word(stream + 8 * j, u);
              const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
              s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(lo, xe));
              s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(hi, xo));
              keep_in_register(s16[j]);
            }
          }
          for (int j = 0; j < 8; ++j) {
            __m256i* p = reinterpret_cast<__m256i*>(isum_mem[j]);
            _mm256_store_si256(p, _mm256_add_epi32(_mm256_load_si256(p), _mm256_madd_epi16(s16[j], ones)));
          }
        }
        const __m256i off = _mm256_set1_epi32(W.fold_offset() * A.qsum[m * A.NB + b]);
        for (int j = 0; j < 8; ++j)
          i32[j] = _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(isum_mem[j])), off);
      } else {  // signed x signed: |w| as the unsigned operand, its sign moved onto x
        for (int j = 0; j < 8; ++j) i32[j] = _mm256_setzero_si256();
        for (int64_t kw = w0; kw < w1; ++kw) {
          if (m == 0) prefetch_run(stream, kw);
          const __m256i x = _mm256_set1_epi32(load_i32(q + kw * 4));
          for (int j = 0; j < 8; ++j) {
            const __m256i v = load_tile_word(stream + 8 * j, kw);
            const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(x, v));
            i32[j] = _mm256_add_epi32(i32[j], _mm256_madd_epi16(p, ones));
          }
        }
      }
      for (int j = 0; j < 8; ++j) add_block8(W, A, y, t + j, m, b, g, i32[j]);
    }
    if (++in_group == per_group) {
      in_group = 0;
      g = std::min(g + 1, W.G - 1);
    }
  }
  if (W.zero_terms())
    for (int64_t m = 0; m < A.M; ++m)
      for (int64_t j = 0; j < 8; ++j) zero_point_terms8(W, A, y, t + j, m);
}

// int8 dot products of one int2 / int3 low word of a tile (16 columns; code r of byte j is column 4j + r, whose
// activation is byte 4r + j of q: ActPerm::Int2) as int16 sums, each code an unsigned byte for vpmaddubsw. int3
// (W = 0 or 1, the word's half of the block) ORs in the high bit from h at bit 2.
template <WKind KIND, int W>
inline __m256i lowbit_dot16(__m256i low, __m256i h, const int8_t* q) {
  const __m256i m03 = _mm256_set1_epi8(0x03), m04 = _mm256_set1_epi8(0x04);
  __m256i sum = _mm256_setzero_si256();
  auto part = [&](auto rc) {
    constexpr int r = decltype(rc)::value;
    __m256i u = _mm256_and_si256(_mm256_srli_epi16(low, 2 * r), m03);
    if constexpr (KIND == WKind::Int3) {
      constexpr int shift = int3_high_bit(W, r) - 2;  // the high bit's place in its byte, moved to bit 2
      const __m256i hs = shift >= 0 ? _mm256_srli_epi16(h, shift) : _mm256_slli_epi16(h, -shift);
      u = _mm256_or_si256(u, _mm256_and_si256(hs, m04));
    }
    sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(u, _mm256_set1_epi32(load_i32(q + 4 * r))));
  };
  unroll<4>(part);
  return sum;
}

// Small M, int2 / int3 weights: as q8_stream, the 8 tiles of one stream against every activation row, one
// activation block at a time, a whole 32-column step (2 int2 words, 3 int3 words) of all 8 tiles at once. The int16
// sums of a step (|sum| <= 8 codes x 2 x 7 x 127 < 2^15) are widened once per step.
template <WKind KIND>
void q8_stream_lowbit(const Weights& W, const QuantAct& A, float* y, int64_t t) {
  constexpr int BW = 32 / block_cols(KIND) * block_words(KIND);  // words per 32 columns
  const uint32_t* stream = stream_words(W, t);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t per_group = W.G == 1 ? A.NB : W.group / A.ablk;
  for (int64_t b = 0, g = 0, in_group = 0; b < A.NB; ++b) {
    const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
    if (in_group == 0) prefetch_scales(W, g, t);
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* q = A.q + m * A.ldq;
      __m256i i32[8];
      for (int j = 0; j < 8; ++j) i32[j] = _mm256_setzero_si256();
      for (int64_t ks = k0 / 32; ks < k1 / 32; ++ks) {
        const int64_t kw = ks * BW;
        if (m == 0)
          for (int i = 0; i < BW; ++i) prefetch_run(stream, kw + i);
        const int8_t* qs = q + ks * 32;
        for (int j = 0; j < 8; ++j) {
          const uint32_t* tile = stream + 8 * j;
          const __m256i l0 = load_tile_word(tile, kw), l1 = load_tile_word(tile, kw + 1);
          const __m256i h = KIND == WKind::Int3 ? load_tile_word(tile, kw + 2) : l0;
          const __m256i s16 = _mm256_add_epi16(lowbit_dot16<KIND, 0>(l0, h, qs), lowbit_dot16<KIND, 1>(l1, h, qs + 16));
          i32[j] = _mm256_add_epi32(i32[j], _mm256_madd_epi16(s16, ones));
        }
      }
      const __m256i off = _mm256_set1_epi32(W.fold_offset() * A.qsum[m * A.NB + b]);
      for (int j = 0; j < 8; ++j) add_block8(W, A, y, t + j, m, b, g, _mm256_sub_epi32(i32[j], off));
    }
    if (++in_group == per_group) {
      in_group = 0;
      g = std::min(g + 1, W.G - 1);
    }
  }
  if (W.zero_terms())
    for (int64_t m = 0; m < A.M; ++m)
      for (int64_t j = 0; j < 8; ++j) zero_point_terms8(W, A, y, t + j, m);
}

}  // namespace

void avx2_gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; t += 2 * kStreamPairs)
    switch (W.kind) {
      case WKind::Int4: q8_stream<WKind::Int4>(W, A, y, t); break;
      case WKind::Int2: q8_stream_lowbit<WKind::Int2>(W, A, y, t); break;
      case WKind::Int3: q8_stream_lowbit<WKind::Int3>(W, A, y, t); break;
      default: q8_stream<WKind::Int8>(W, A, y, t); break;
    }
}

// ---- GEMM (M >= 16) ---------------------------------------------------------------------------------------------

namespace {

// GEMM (M >= 16), int8 weights: one 8-row tile against MB activation rows over activation blocks [b0, b1); each
// weight word is loaded once for the MB rows. Signed x signed: |q| is the unsigned operand, its sign moved to x.
template <int MB>
void q8_tile8(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t m0, int64_t b0, int64_t b1) {
  const uint32_t* wt = W.tile_words(t);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* q[MB];
  for (int r = 0; r < MB; ++r) q[r] = A.q + (m0 + r) * A.ldq;
  const bool lead = m0 == 0 && t % (2 * kStreamPairs) == 0;  // the first pass over this range of the stream
  const uint32_t* stream = stream_words(W, t);
  // float accumulators live in y (zero-initialised), touched once per block: keeps registers for the integer sums
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
    __m256i iacc[MB];
    for (int r = 0; r < MB; ++r) iacc[r] = _mm256_setzero_si256();
    for (int64_t kw = k0 / 4; kw < k1 / 4; ++kw) {
      if (lead) prefetch_run(stream, kw);
      const __m256i v = load_tile_word(wt, kw);
      const __m256i av = _mm256_abs_epi8(v);
      for (int r = 0; r < MB; ++r) {
        const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(q[r] + kw * 4)), v);
        iacc[r] = _mm256_add_epi32(iacc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(av, x), ones));
      }
    }
    const int64_t g = W.group_of(k0);
    for (int r = 0; r < MB; ++r) add_block8(W, A, y, t, m0 + r, b, g, iacc[r]);
  }
  if (b1 == A.NB && W.zero_terms())
    for (int r = 0; r < MB; ++r) zero_point_terms8(W, A, y, t, m0 + r);
}

// GEMM (M >= 16), int4: tiles t and t + 1 (one tile pair, t even) against MB activation rows over blocks [b0, b1);
// each word is loaded and its nibbles split once for the MB rows, each row's broadcasts serve both tiles, and the
// int32 sums live in L1 (in registers beside the rest, GCC kept the int16 sums on the stack: a store-to-load round
// trip per word). Zen 3, M=128, K=4096, 64 KiB of weights: 2.6 cycles per activation row x tile x word against 3.0
// for the one-tile kernel it replaced on 2026-12-05.
template <int MB>
void q8_pair4(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t m0, int64_t b0, int64_t b1) {
  const uint32_t* wp = W.tile_words(t);
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  const int8_t* q[MB];
  for (int r = 0; r < MB; ++r) q[r] = A.q + (m0 + r) * A.ldq;
  const bool lead = m0 == 0 && t % (2 * kStreamPairs) == 0;  // the first pass over this range of the stream
  const uint32_t* stream = stream_words(W, t);
  alignas(32) int32_t isum[MB][2][8];
  int32_t(*isum_mem)[2][8] = isum;
  __asm__("" : "+r"(isum_mem));  // opaque to GCC: not promoted back into registers
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
    for (int r = 0; r < MB; ++r)
      for (int p = 0; p < 2; ++p)
        _mm256_store_si256(reinterpret_cast<__m256i*>(isum_mem[r][p]), _mm256_setzero_si256());
    for (int64_t kw = k0 / 8; kw < k1 / 8; kw += 4) {
      __m256i s16[MB][2];
      for (int r = 0; r < MB; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
      for (int u = 0; u < 4; ++u) {
        if (lead) prefetch_run(stream, kw + u);
        const __m256i v0 = load_tile_word(wp, kw + u), v1 = load_tile_word(wp + 8, kw + u);
        const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
        const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
        for (int r = 0; r < MB; ++r) {
          const __m256i xe = _mm256_set1_epi32(load_i32(q[r] + (kw + u) * 8));
          const __m256i xo = _mm256_set1_epi32(load_i32(q[r] + (kw + u) * 8 + 4));
          s16[r][0] = _mm256_add_epi16(s16[r][0], _mm256_maddubs_epi16(lo0, xe));
          s16[r][1] = _mm256_add_epi16(s16[r][1], _mm256_maddubs_epi16(lo1, xe));
          s16[r][0] = _mm256_add_epi16(s16[r][0], _mm256_maddubs_epi16(hi0, xo));
          s16[r][1] = _mm256_add_epi16(s16[r][1], _mm256_maddubs_epi16(hi1, xo));
          keep_in_register(s16[r][0]);
          keep_in_register(s16[r][1]);
        }
      }
      for (int r = 0; r < MB; ++r)
        for (int p = 0; p < 2; ++p) {
          __m256i* ptr = reinterpret_cast<__m256i*>(isum_mem[r][p]);
          _mm256_store_si256(ptr, _mm256_add_epi32(_mm256_load_si256(ptr), _mm256_madd_epi16(s16[r][p], ones)));
        }
    }
    const int64_t g = W.group_of(k0);
    const int32_t fold = W.fold_offset();
    for (int r = 0; r < MB; ++r) {
      const __m256i off = _mm256_set1_epi32(fold * A.qsum[(m0 + r) * A.NB + b]);
      for (int p = 0; p < 2; ++p)
        add_block8(W, A, y, t + p, m0 + r, b, g,
                   _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(isum_mem[r][p])), off));
    }
  }
  if (b1 == A.NB && W.zero_terms())
    for (int r = 0; r < MB; ++r)
      for (int p = 0; p < 2; ++p) zero_point_terms8(W, A, y, t + p, m0 + r);
}


// GEMM driver: the tiles of [t0, t1) over activation blocks taken in chunks; each (row, tile) still takes its
// blocks in order, then the zero-point term, so the result is bit for bit that of one pass over all blocks. Two
// limits set the chunk:
//  - the chunk's int8 rows (M x chunk bytes) stay in L2 while every tile of [t0, t1) uses them (the whole of q,
//    M x K bytes, is 1.8 MB at M = 128, K = 14336: read from L3 once per tile it made the GEMM slower than
//    onnxruntime's);
//  - a tile pair's words for the chunk (16 rows x chunk / 2 bytes for int4: 8 KiB at the 32 KiB stream limit)
//    stay in L1 while the M / 4 row groups use them.
constexpr int64_t kQ8ChunkBytes = 128 << 10, kStreamChunkBytes = 32 << 10;

template <WKind KIND>
void q8_t(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  const int64_t stream_block_bytes = 16 * kStreamPairs * A.ablk / (KIND == WKind::Int4 ? 2 : 1);
  const int64_t chunk =
      std::max<int64_t>(1, std::min(kQ8ChunkBytes / (A.M * A.ablk), kStreamChunkBytes / stream_block_bytes));
  // chunk by chunk over all the streams of [t0, t1) (the chunk's activation rows stay in L2); t0 and t1 are whole
  // streams, so int4 tiles go in pairs
  for (int64_t b0 = 0; b0 < A.NB; b0 += chunk) {
    const int64_t b1 = std::min(A.NB, b0 + chunk);
    if constexpr (KIND == WKind::Int4) {
      for (int64_t t = t0; t < t1; t += 2) {
        int64_t m = 0;
        for (; m + 4 <= A.M; m += 4) q8_pair4<4>(W, A, y, t, m, b0, b1);
        for (; m < A.M; ++m) q8_pair4<1>(W, A, y, t, m, b0, b1);
      }
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t m = 0;
        for (; m + 4 <= A.M; m += 4) q8_tile8<4>(W, A, y, t, m, b0, b1);
        for (; m < A.M; ++m) q8_tile8<1>(W, A, y, t, m, b0, b1);
      }
    }
  }
}

}  // namespace

// M >= 16 (the GEMM slot of the table); int2 / int3 take the GEMV kernel, which runs any M
void avx2_gemm_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  if (is_low_bit(W.kind)) return avx2_gemv_q8(W, A, y, t0, t1);
  if (W.kind == WKind::Int4)
    q8_t<WKind::Int4>(W, A, y, t0, t1);
  else
    q8_t<WKind::Int8>(W, A, y, t0, t1);
}

}  // namespace compressor

#endif
