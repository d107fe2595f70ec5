// Internal to the AVX2 kernels (kernels_avx2*.cpp; include only from translation units compiled with the AVX2
// flags): the inline helpers that read the repacked weight layout (kernels.h) 8 rows at a time, and the kernel-table
// entry points each AVX2 translation unit defines for the table in kernels_avx2.cpp.
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__)
#error "avx2_decode.h needs the AVX2 flags (setup.py ISA_FLAGS): include it only from the AVX2 translation units"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace compressor {

// int weights x int8 activations (kernels_avx2_q8.cpp): the table's gemv_q8 and gemm_q8 slots
void avx2_gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1);
void avx2_gemm_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1);
// int / fp8 weights x float activations (kernels_avx2_f32.cpp): the table's gemv_f32 and gemm_f32 slots
void avx2_gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1);
void avx2_gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1);

// Internal linkage, as when these lived in one translation unit's anonymous namespace: every AVX2 translation unit
// inlines its own copy, and none can be merged at link time with a same-named helper built with other ISA flags.
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

}  // namespace
}  // namespace compressor
