// AVX2 + FMA kernels (compiled with -mavx2 -mfma; chosen at run time only when the CPU and OS support them).
// Lanes of a 256-bit vector are the 8 rows of a weight tile, so accumulators never need horizontal sums.
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels_avx2.h"

namespace compressor {
namespace {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Scales of 8 rows from column col of group g as float32 (16-bit storage widened exactly)
inline __m256 scale_row8(const Weights& W, int64_t g, int64_t col) {
  const char* p = W.scale_addr(g, col);
  if (W.stype == SType::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (W.stype == SType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// z * s of 8 rows from column col of group g (the stored row, or zoff * s for symmetric weights: exact)
inline __m256 zs_row8(const Weights& W, int64_t g, int64_t col) {
  if (W.zs) return _mm256_loadu_ps(W.zs + g * W.Np + col);
  return _mm256_mul_ps(scale_row8(W, g, col), _mm256_set1_ps(W.zoff));
}

// Word kw of a tile (Weights::tile_words): its 8 rows' words, the low or high half of the pair's 64-byte line.
inline __m256i load_tile_word(const uint32_t* tile, int64_t kw) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + kw * kPairWordStride));
}

// The words of the weight stream that holds tile t (its 4 pairs' words kw are one 256-byte run at
// + kw * kPairWordStride). Computed once per call: Weights::pair_words divides by the run-time codes per word, and
// an integer division per word sat in the GEMV's loop while it prefetched.
inline const uint32_t* stream_words(const Weights& W, int64_t t) {
  return W.pair_words(t / (2 * kStreamPairs) * kStreamPairs);
}

// Prefetch of the 256-byte run of word kw + kPrefetchWords of a stream (its 4 pairs' lines): the first tile of a
// stream to pass over a range of words calls it, the stream's other tiles then find the run in cache. Without it
// the streams' layout (every tile reads 32 bytes of each run) left the hardware prefetcher behind: 4096 x 14336
// and 8192 x 8192 M=1 GEMVs 1.1-1.5x slower than with one stream per pair.
inline void prefetch_run(const uint32_t* stream, int64_t kw) {
  const uint32_t* run = stream + (kw + kPrefetchWords) * kPairWordStride;
  for (int l = 0; l < kStreamPairs; ++l) _mm_prefetch(reinterpret_cast<const char*>(run + 16 * l), _MM_HINT_T0);
}

// Prefetch of the scales (and z * s rows) of the stream that holds tile t for group g + kScaleGroupsAhead (past the
// stream's last group: the next stream's first groups). A stream's 64 rows of one group are 128 or 256 bytes of a
// [G, Np] row, the next group's Np entries further on: a stride the hardware prefetcher did not follow. Without
// this every block of a cache-cold GEMV waited on its scale load (Zen 3, 2026-12-05: perf put half of q8_stream's
// samples on it, and the cold 14336 x 4096 GEMV read at 0.67-0.77x a plain read's rate against 0.86-0.95x in a
// harness whose scales stayed cached; with it 0.87-0.93x).
constexpr int64_t kScaleGroupsAhead = 2;
inline void prefetch_scales(const Weights& W, int64_t g, int64_t t) {
  int64_t row = t / (2 * kStreamPairs) * kStreamRows;
  g += kScaleGroupsAhead;
  if (g >= W.G) {
    g -= W.G;
    row += kStreamRows;
    if (row >= W.Np || g >= W.G) return;
  }
  // `asm volatile`: written with _mm_prefetch (a loop, or straight-line under a branch), GCC 12 at -O3 emitted
  // none of these prefetches (checked in the assembly)
  auto lines = [](const void* p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __asm__ volatile("prefetcht0 %0" : : "m"(static_cast<const char*>(p)[o]));
  };
  lines(W.scale_addr(g, row), kStreamRows * W.scale_bytes());
  if (W.zs) lines(W.zs + g * W.Np + row, kStreamRows * 4);
}

// Code I of each lane's word as float: int4 nibble u, int2 code u, int8 signed byte q, fp8 the exact E4M3 value.
template <WKind KIND, int I>
inline __m256 decode(__m256i v) {
  if constexpr (KIND == WKind::Int4) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * I), _mm256_set1_epi32(0xF)));
  } else if constexpr (KIND == WKind::Int2) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 2 * I), _mm256_set1_epi32(3)));
  } else if constexpr (KIND == WKind::Int8) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * I), 24));
  } else {
    // byte at the top, arithmetic shift by 4 -> sign at bit 31, exponent+mantissa at bits 20..26: the E4M3
    // value times 2^-120 as a float32 (subnormals included); the multiply restores it exactly.
    const __m256i t = _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * I), 4);
    const __m256 raw = _mm256_castsi256_ps(_mm256_and_si256(t, _mm256_set1_epi32(static_cast<int>(0x87F00000u))));
    return _mm256_mul_ps(raw, _mm256_set1_ps(0x1p120f));
  }
}

// As decode, but int4 codes centred: u - 8 (sign-extended from the word XOR 0x88888888 that fma_word applies).
template <WKind KIND, int I>
inline __m256 decode_centred(__m256i v) {
  if constexpr (KIND == WKind::Int4) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28 - 4 * I), 28));
  } else {
    return decode<KIND, I>(v);
  }
}

// Column I of an int3 block (low words l0, l1, high word h; kernels.h) as int32: its low bits and its high bit
template <int I>
inline __m256i int3_low(__m256i l0, __m256i l1) {
  constexpr int i = I % 16;
  const __m256i low = I < 16 ? l0 : l1;
  if constexpr (i == 15) return _mm256_srli_epi32(low, 30);
  return _mm256_srli_epi32(_mm256_slli_epi32(low, 30 - 2 * i), 30);
}
template <int I>
constexpr int int3_bit() {
  return 8 * (I % 16 / 4) + int3_high_bit(I / 16, I % 4);
}

// Column I of an int3 block, the unsigned code u = low + 4 high (dequantized panels)
template <int I>
inline __m256 decode_int3(__m256i l0, __m256i l1, __m256i h) {
  const __m256i high = _mm256_and_si256(_mm256_srli_epi32(h, int3_bit<I>()), _mm256_set1_epi32(1));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(int3_low<I>(l0, l1), _mm256_slli_epi32(high, 2)));
}

// Column I of an int3 block centred, u - 4 = low - 4 (1 - high), from the inverted high word hn
template <int I>
inline __m256 decode_int3_centred(__m256i l0, __m256i l1, __m256i hn) {
  const __m256i minus = _mm256_srai_epi32(_mm256_slli_epi32(hn, 31 - int3_bit<I>()), 31);  // 0 or -1
  return _mm256_cvtepi32_ps(_mm256_add_epi32(int3_low<I>(l0, l1), _mm256_slli_epi32(minus, 2)));
}

// Optimisation barrier: stops GCC from reassociating the int16 sums into a tree of 32 live products (which spills
// them to the stack); the sums stay running accumulators in registers.
inline void keep_in_register(__m256i& v) { __asm__("" : "+x"(v)); }

// ---- int weights x int8 activations ---------------------------------------------------------------------

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

void gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; t += 2 * kStreamPairs)
    switch (W.kind) {
      case WKind::Int4: q8_stream<WKind::Int4>(W, A, y, t); break;
      case WKind::Int2: q8_stream_lowbit<WKind::Int2>(W, A, y, t); break;
      case WKind::Int3: q8_stream_lowbit<WKind::Int3>(W, A, y, t); break;
      default: q8_stream<WKind::Int8>(W, A, y, t); break;
    }
}

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

// M >= 16 (the GEMM slot of the table); int2 / int3 take the GEMV kernel, which runs any M
void q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  if (is_low_bit(W.kind)) return gemv_q8(W, A, y, t0, t1);
  if (W.kind == WKind::Int4)
    q8_t<WKind::Int4>(W, A, y, t0, t1);
  else
    q8_t<WKind::Int8>(W, A, y, t0, t1);
}

// ---- float activations, float32 accumulation ------------------------------------------------------------

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

void gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
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

void gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
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

// ---- activation quantization -----------------------------------------------------------------------------

// int8 codes of 8 columns (int32 lanes in [-127, 127]) as 8 bytes, in the int4 order [0, 2, 4, 6, 1, 3, 5, 7] when
// perm: each 128-bit half shuffles its 4 low bytes to their places, the halves are ORed
inline __m128i codes_to_bytes(__m256i c, bool perm) {
  const __m256i order = perm ? _mm256_setr_epi8(0, 8, -1, -1, 4, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                -1, -1, 0, 8, -1, -1, 4, 12, -1, -1, -1, -1, -1, -1, -1, -1)
                             : _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                                -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(c, order);
  return _mm_or_si128(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

// As scalar_quantize, 8 columns at a time (the same float operations: |x| max, x * (127 / amax) rounded to nearest
// even by the MXCSR default, clamped): bit-identical codes, scales and sums. Until 2026-12-05 the AVX2 table used
// the scalar loop.
void quantize(const float* x, int64_t K, int64_t Kp, int64_t ldq, int64_t ablk, ActPerm perm, int8_t* q, float* xs,
              int32_t* qsum, int64_t m0, int64_t m1) {
  // int2 order: 16 columns at a time (a 4 x 4 transpose of their bytes, its own inverse)
  const __m128i transpose = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int64_t NB = (Kp + ablk - 1) / ablk;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), lo = _mm256_set1_epi32(-127),
                hi = _mm256_set1_epi32(127);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * ldq;
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t k0 = b * ablk, k1 = std::min(k0 + ablk, K);
      // columns k .. k + 7 that are < k1 (zeros past it)
      auto load = [&](int64_t k) {
        if (k1 - k >= 8) return _mm256_loadu_ps(xr + k);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(k1 - k)), lanes);
        return _mm256_maskload_ps(xr + k, mask);
      };
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load(k), abs_mask));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i sum = _mm256_setzero_si256();
      auto codes = [&](int64_t k) {
        const __m256i c = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load(k), inv)), lo), hi);
        sum = _mm256_add_epi32(sum, c);
        return c;
      };
      if (perm == ActPerm::Int2) {
        for (int64_t k = k0; k < k1; k += 16) {  // k + 16 <= k0 + ablk (blocks are multiples of 32 columns)
          const __m128i lo8 = codes_to_bytes(codes(k), false), hi8 = codes_to_bytes(codes(k + 8), false);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k),
                           _mm_shuffle_epi8(_mm_unpacklo_epi64(lo8, hi8), transpose));
        }
      } else {
        for (int64_t k = k0; k < k1; k += 8)  // k + 8 <= k0 + ablk: the store stays inside the block
          _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), codes_to_bytes(codes(k), perm == ActPerm::Int4));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      xs[m * NB + b] = amax / 127.f;
      qsum[m * NB + b] = _mm_cvtsi128_si32(s4);
    }
  }
}

const KernelTable kTable{"avx2", gemv_q8, q8, gemv_f32, gemm_f32, quantize, scalar_read};

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

const KernelTable* avx2_kernels() { return &kTable; }

}  // namespace compressor

#else

namespace compressor {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace compressor

#endif
