// The SIMD driver of the dense 16-bit weight product (kernels_dense.h), shared by the AVX2 and AVX-512 translation
// units: each includes it after defining its vector traits, so everything here is in an anonymous namespace
// (one copy per TU, compiled with that TU's flags; an inline function shared between them could be linked from the
// wrong one).
//
// Traits V: Vec (kLanes float32 lanes; kParts vectors make the 16 chains of kernels_dense.h), load / store,
// fma(a, b, c) = a * b + c, widen<H>(p, part) (lanes part * kLanes .. of 16 weights), widen_tail<H>(p, part, n)
// (the first n of the step's weights, zeros after), reduce4(acc[4][kParts], out[4]) (the tree of kernels_dense.h
// for 4 chain sets), and the tile shapes kGemvRows (weight rows per tile at M < kGemmM) and kMR x kNR (GEMM).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels_dense.h"

namespace compressor {
namespace {

constexpr int64_t kGemmM = 4;  // from this M on, register tiles of kMR activation rows x kNR weight rows
constexpr int64_t kDenseKcSteps = 16;  // GEMM: K block of 256 columns (x block and weight tiles stay in L1)
constexpr int64_t kDenseBlockRows = 32;  // GEMM: weight rows whose chains are carried across K blocks
// GEMV software prefetch distance in bytes (at least: a whole tile when larger). One thread, Zen 5, bfloat16 M = 1,
// a C++ harness: without the prefetch SmolLM2's 576 x 49152 head read at 20 GB/s, with the next tile prefetched
// (9 KiB ahead) at 40 GB/s, 16 KiB ahead 45-48 GB/s; 4096 x 4096 1.4x faster with it at any distance tried.
constexpr int64_t kDensePrefetch = 16 << 10;

// Writes the sums of chain sets t = i * NR + j (in `c`, or `state` when c is null) + bias to y[m0 + i][n0 + j],
// rows past M or past n_end left out. Chain sets are reduced 4 at a time (zero sets pad the last 4).
template <class V, int MR, int NR>
void dense_store(const Dense16& D, int64_t m0, int64_t n0, int64_t n_end, const typename V::Vec (*c)[V::kParts],
                 const float* state) {
  using Vec = typename V::Vec;
  constexpr int P = V::kParts, T = (MR * NR + 3) / 4 * 4;
  alignas(16) float sums[T];
  for (int t = 0; t < T; t += 4) {
    Vec a[4][P];
    for (int q = 0; q < 4; ++q)
      for (int p = 0; p < P; ++p)
        a[q][p] = t + q >= MR * NR ? V::zero() : c ? c[t + q][p] : V::load(state + (t + q) * 16 + p * V::kLanes);
    V::reduce4(a, sums + t);
  }
  for (int i = 0; i < MR && m0 + i < D.M; ++i)
    for (int j = 0; j < NR && n0 + j < n_end; ++j) {
      const float s = sums[i * NR + j];
      D.y[(m0 + i) * D.N + n0 + j] = D.bias ? s + D.bias[n0 + j] : s;
    }
}

// Pointers to the MR activation rows from m0 and the NR weight rows from n0 (rows past M or past n_end: the last
// valid one, computed and not written).
template <int MR, int NR>
void dense_rows_at(const Dense16& D, int64_t m0, int64_t n0, int64_t n_end, const float** x, const uint16_t** w) {
  for (int i = 0; i < MR; ++i) x[i] = D.x + std::min(m0 + i, D.M - 1) * D.ldx;
  for (int j = 0; j < NR; ++j) w[j] = D.w + std::min(n0 + j, n_end - 1) * D.K;
}

// Steps [s0, s1) of K for part p of the chains of MR x NR (row, weight row) pairs: c[i * NR + j] += w_j * x_i.
// The step past the last whole one (K % 16 columns) loads its weights masked.
template <class V, Half H, int MR, int NR>
inline void dense_steps(const Dense16& D, const float* const* x, const uint16_t* const* w, int64_t s0, int64_t s1,
                        int p, typename V::Vec* c) {
  using Vec = typename V::Vec;
  const int64_t full = std::min(s1, D.K / kDenseChains);
  auto step = [&](int64_t s, auto widen) {
    Vec xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = V::load(x[i] + s * kDenseChains + p * V::kLanes);
    for (int j = 0; j < NR; ++j) {
      const Vec wv = widen(w[j] + s * kDenseChains);
      for (int i = 0; i < MR; ++i) c[i * NR + j] = V::fma(wv, xv[i], c[i * NR + j]);
    }
  };
  for (int64_t s = s0; s < full; ++s) step(s, [p](const uint16_t* q) { return V::template widen<H>(q, p); });
  if (full < s1) {
    const int64_t n = D.K - full * kDenseChains;
    step(full, [p, n](const uint16_t* q) { return V::template widen_tail<H>(q, p, n); });
  }
}

// GEMV tile (M < kGemmM): MR x NR pairs over all of K, the parts of each step in turn, chains in registers.
template <class V, Half H, int MR, int NR>
void dense_gemv_tile(const Dense16& D, int64_t m0, int64_t n0, int64_t n_end) {
  using Vec = typename V::Vec;
  constexpr int P = V::kParts;
  const float* x[MR];
  const uint16_t* w[NR];
  dense_rows_at<MR, NR>(D, m0, n0, n_end, x, w);
  Vec c[MR * NR][P];
  for (int t = 0; t < MR * NR; ++t)
    for (int p = 0; p < P; ++p) c[t][p] = V::zero();
  auto step = [&](int64_t s, auto widen) {
    for (int p = 0; p < P; ++p) {
      Vec xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = V::load(x[i] + s * kDenseChains + p * V::kLanes);
      for (int j = 0; j < NR; ++j) {
        const Vec wv = widen(w[j] + s * kDenseChains, p);
        for (int i = 0; i < MR; ++i) c[i * NR + j][p] = V::fma(wv, xv[i], c[i * NR + j][p]);
      }
    }
  };
  const int64_t full = D.K / kDenseChains;
  // the tile's weights are contiguous rows, and so are the next tiles': prefetch ahead of this tile's position, at
  // the rate it reads (NR * 32 bytes per step), by a whole tile or 16 KiB whichever is more
  const char* ahead = reinterpret_cast<const char*>(D.w + n0 * D.K) + std::max<int64_t>(NR * D.K * 2, kDensePrefetch);
  for (int64_t s = 0; s < full; ++s) {
    for (int l = 0; l < NR * 32; l += 64) __builtin_prefetch(ahead + s * NR * 32 + l, 0, 3);
    step(s, [](const uint16_t* q, int p) { return V::template widen<H>(q, p); });
  }
  if (full < D.steps()) {
    const int64_t n = D.K - full * kDenseChains;
    step(full, [n](const uint16_t* q, int p) { return V::template widen_tail<H>(q, p, n); });
  }
  dense_store<V, MR, NR>(D, m0, n0, n_end, c, nullptr);
}

// GEMM tile: MR x NR pairs over steps [s0, s1), one part at a time (AVX2: 8 of the 16 chains in registers, so the
// tile can be larger), chains from zero (first) or from `state` ([MR * NR][16] floats) and saved back to it; after
// the last step of K they are reduced into y.
template <class V, Half H, int MR, int NR>
void dense_gemm_tile(const Dense16& D, int64_t m0, int64_t n0, int64_t n_end, int64_t s0, int64_t s1, float* state,
                     bool first, bool last) {
  using Vec = typename V::Vec;
  const float* x[MR];
  const uint16_t* w[NR];
  dense_rows_at<MR, NR>(D, m0, n0, n_end, x, w);
  for (int p = 0; p < V::kParts; ++p) {
    Vec c[MR * NR];
    for (int t = 0; t < MR * NR; ++t) c[t] = first ? V::zero() : V::load(state + t * 16 + p * V::kLanes);
    dense_steps<V, H, MR, NR>(D, x, w, s0, s1, p, c);
    for (int t = 0; t < MR * NR; ++t) V::store(state + t * 16 + p * V::kLanes, c[t]);
  }
  if (last) dense_store<V, MR, NR>(D, m0, n0, n_end, nullptr, state);
}

// Rows [n0, n1) for every M. M < kGemmM: a GEMV, each tile of kGemvRows weight rows over all of K per activation
// row (the tile's weights come back from L1 / L2 for the next row). Larger M: blocks of kDenseBlockRows weight rows;
// per kMR activation rows, K in blocks of 256 columns, each tile's chains carried from block to block in `state`.
template <class V, Half H>
void dense_rows(const Dense16& D, int64_t n0, int64_t n1) {
  const int64_t steps = D.steps();
  if (D.M < kGemmM) {
    for (int64_t n = n0; n < n1; n += V::kGemvRows)
      for (int64_t m = 0; m < D.M; ++m) dense_gemv_tile<V, H, 1, V::kGemvRows>(D, m, n, n1);
    return;
  }
  constexpr int MR = V::kMR, NR = V::kNR, tiles = (kDenseBlockRows + NR - 1) / NR;
  alignas(64) float state[tiles][MR * NR * 16];
  for (int64_t nb = n0; nb < n1; nb += tiles * NR) {
    const int64_t nb1 = std::min(nb + tiles * NR, n1);
    for (int64_t m = 0; m < D.M; m += MR)
      for (int64_t s = 0; s < steps || s == 0; s += kDenseKcSteps) {
        const int64_t s1 = std::min(s + kDenseKcSteps, steps);
        for (int64_t n = nb; n < nb1; n += NR)
          dense_gemm_tile<V, H, MR, NR>(D, m, n, n1, s, s1, state[(n - nb) / NR], s == 0, s1 == steps);
      }
  }
}

template <class V>
void dense_kernel(const Dense16& D, int64_t n0, int64_t n1) {
  if (D.half == Half::BF16)
    dense_rows<V, Half::BF16>(D, n0, n1);
  else
    dense_rows<V, Half::F16>(D, n0, n1);
}

}  // namespace
}  // namespace compressor
