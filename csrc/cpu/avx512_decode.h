// Internal to the AVX-512 kernels (kernels_avx512*.cpp; include only from translation units compiled with the
// AVX-512 flags): the inline helpers more than one of them uses, and the kernel-table entry points each defines for
// the table in kernels_avx512.cpp. The helpers the AMX translation unit shares are in kernels_avx512.h.
#pragma once

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX2__) && defined(__FMA__))
#error "avx512_decode.h needs the AVX-512 flags (setup.py ISA_FLAGS): include it only from the AVX-512 TUs"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace compressor {

// int weights x int8 activations (kernels_avx512_q8.cpp): the table's gemv_q8 and gemm_q8 slots
void avx512_gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1);
void avx512_gemm_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1);
// int / fp8 weights x float activations (kernels_avx512_f32.cpp): the table's gemv_f32 and gemm_f32 slots
void avx512_gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1);
void avx512_gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1);

// Internal linkage, as when these lived in one translation unit's anonymous namespace: every AVX-512 translation
// unit inlines its own copy, and none can be merged at link time with a same-named helper built with other flags.
namespace {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Prefetch of word kw + kPrefetchWords of a pair (one 64-byte line; the 4 pairs' lines of a word are one 256-byte
// run of the stream)
inline void prefetch_ahead(const uint32_t* pair, int64_t kw) {
  _mm_prefetch(reinterpret_cast<const char*>(pair + (kw + kPrefetchWords) * kPairWordStride), _MM_HINT_T0);
}

}  // namespace
}  // namespace compressor
