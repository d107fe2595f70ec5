// AMX-INT8 kernel for int weights x int8 activations at M >= 16 (prefill), compiled with -mamx-tile -mamx-int8
// and the AVX-512 flags; chosen at run time only when the CPU has AMX-TILE/INT8 and Linux grants the tile state
// (arch_prctl, done by the dispatcher). Everything else comes from the AVX-512 table.
//
// One tile pair (16 weight rows) at a time: its weights for all of K are unpacked once into the AMX B layout
// (rows of 4 activation positions x 16 weight rows; for int4 that is just the low and the high nibbles of the
// repacked words), then every 16-row activation tile runs one tile product per activation block (TDPBSUD: signed
// activations x unsigned int4 codes, TDPBSSD for int8) and folds the block's int32 tile into 16 float
// accumulators, in the scalar reference's order: the results are bit-identical to it.
#include "kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels_avx512.h"

namespace compressor {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0..3: C, 16 x 16 int32; tmm4, tmm5: A, 16 activation rows x kd bytes; tmm6, tmm7: B, kd/4 rows x 64 bytes.
void configure(int kd) {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = static_cast<uint16_t>(i == 4 || i == 5 ? kd : 64);
    c.rows[i] = static_cast<uint8_t>(i >= 6 ? kd / 4 : 16);
  }
  _tile_loadconfig(&c);
}

// B panel of tiles t, t+1 for all of K (rows_total rows of 64 bytes, zero past Kp): row r holds activation
// positions 4r..4r+3 for the 16 weight rows. int4 word kw: low nibbles = positions 8kw..8kw+3 of the permuted
// activations, high nibbles = 8kw+4..8kw+7; int8 word kw = positions 4kw..4kw+3.
template <WKind KIND>
void unpack_panel(const Weights& W, int64_t t, int64_t rows_total, uint8_t* B) {
  const int64_t Kw = W.Kw();
  const uint32_t* pair = W.pair_words(t / 2);
  const __m512i low = _mm512_set1_epi8(0x0F);
  int64_t r = 0;
  for (int64_t kw = 0; kw < Kw; ++kw) {
    const __m512i v = avx512_load_pair(pair, kw);
    if constexpr (KIND == WKind::Int4) {
      _mm512_storeu_si512(B + 64 * r++, _mm512_and_si512(v, low));
      _mm512_storeu_si512(B + 64 * r++, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    } else {
      _mm512_storeu_si512(B + 64 * r++, v);
    }
  }
  if (r < rows_total) std::memset(B + 64 * r, 0, static_cast<size_t>(64 * (rows_total - r)));
}

// Tile numbers are immediates (GCC's intrinsics paste them into the instruction text): tile products C_i in
// tmm0..3, A in tmm4/tmm5, B in tmm6/tmm7. int4 codes are unsigned (TDPBSUD), int8 codes signed (TDPBSSD).
#define COMPRESSOR_TILE_DOT(c, a, b) \
  do {                               \
    if constexpr (KIND == WKind::Int4) \
      _tile_dpbsud(c, a, b);         \
    else                             \
      _tile_dpbssd(c, a, b);         \
  } while (0)

// MT activation tiles x NP tile pairs (MT * NP <= 4 independent tile products, so consecutive products do not wait
// for each other) from activation tile mt0 and the NP panels. Float accumulators in `acc` (L1): [MT*NP][16][16].
template <WKind KIND, int MT, int NP>
void block_tiles(const Weights& W, const QuantAct& A, float* y, int64_t t, int64_t mt0, const uint8_t* const* panels,
                 int kd, int64_t per_block, int64_t chunks) {
  static_assert(MT * NP <= 4);
  alignas(64) int32_t tiles[4][16 * 16];
  alignas(64) float acc[4][16 * 16] = {};
  auto tile_id = [](int i, int j) { return i * NP + j; };
  for (int64_t b = 0; b < A.NB; ++b) {
    const int64_t c0 = b * per_block, c1 = std::min(c0 + per_block, chunks);
    _tile_zero(0);
    if constexpr (MT * NP > 1) _tile_zero(1);
    if constexpr (MT * NP > 2) _tile_zero(2);
    if constexpr (MT * NP > 3) _tile_zero(3);
    for (int64_t c = c0; c < c1; ++c) {
      const int8_t* a = A.q + (mt0 * 16) * A.ldq + c * kd;
      const int64_t boff = c * kd * 16;
      if constexpr (MT == 4) {  // one panel, four activation tiles
        _tile_loadd(6, panels[0] + boff, 64);
        _tile_loadd(4, a, A.ldq);
        COMPRESSOR_TILE_DOT(0, 4, 6);
        _tile_loadd(5, a + 16 * A.ldq, A.ldq);
        COMPRESSOR_TILE_DOT(1, 5, 6);
        _tile_loadd(4, a + 32 * A.ldq, A.ldq);
        COMPRESSOR_TILE_DOT(2, 4, 6);
        _tile_loadd(5, a + 48 * A.ldq, A.ldq);
        COMPRESSOR_TILE_DOT(3, 5, 6);
      } else if constexpr (MT == 2) {  // NP in 1, 2
        _tile_loadd(4, a, A.ldq);
        _tile_loadd(5, a + 16 * A.ldq, A.ldq);
        _tile_loadd(6, panels[0] + boff, 64);
        COMPRESSOR_TILE_DOT(0, 4, 6);
        if constexpr (NP == 2) {
          _tile_loadd(7, panels[1] + boff, 64);
          COMPRESSOR_TILE_DOT(1, 4, 7);
          COMPRESSOR_TILE_DOT(2, 5, 6);
          COMPRESSOR_TILE_DOT(3, 5, 7);
        } else {
          COMPRESSOR_TILE_DOT(1, 5, 6);
        }
      } else {  // MT == 1, NP in 1..4
        _tile_loadd(4, a, A.ldq);
        _tile_loadd(6, panels[0] + boff, 64);
        COMPRESSOR_TILE_DOT(0, 4, 6);
        if constexpr (NP > 1) {
          _tile_loadd(7, panels[1] + boff, 64);
          COMPRESSOR_TILE_DOT(1, 4, 7);
        }
        if constexpr (NP > 2) {
          _tile_loadd(6, panels[2] + boff, 64);
          COMPRESSOR_TILE_DOT(2, 4, 6);
        }
        if constexpr (NP > 3) {
          _tile_loadd(7, panels[3] + boff, 64);
          COMPRESSOR_TILE_DOT(3, 4, 7);
        }
      }
    }
    _tile_stored(0, tiles[0], 64);
    if constexpr (MT * NP > 1) _tile_stored(1, tiles[1], 64);
    if constexpr (MT * NP > 2) _tile_stored(2, tiles[2], 64);
    if constexpr (MT * NP > 3) _tile_stored(3, tiles[3], 64);
    const int64_t g = W.group_of(b * A.ablk);
    for (int j = 0; j < NP; ++j) {
      const __m512 s = avx512_scale_row(W, g, t * 8 + 16 * j);
      for (int i = 0; i < MT; ++i) {
        const int id = tile_id(i, j);
        const float* xs = A.xs + (mt0 + i) * 16 * A.NB + b;
        const int32_t* qsum = A.qsum + (mt0 + i) * 16 * A.NB + b;  // zero past M, like xs
        const int32_t fold = KIND == WKind::Int4 ? W.fold_offset() : 0;
        for (int r = 0; r < 16; ++r) {
          const __m512 sc = _mm512_mul_ps(s, _mm512_set1_ps(xs[r * A.NB]));
          float* ar = acc[id] + 16 * r;
          const __m512i dot =
              _mm512_sub_epi32(_mm512_load_si512(tiles[id] + 16 * r), _mm512_set1_epi32(fold * qsum[r * A.NB]));
          _mm512_store_ps(ar, _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, _mm512_load_ps(ar)));
        }
      }
    }
  }
  // zero-point terms, groups outer so that the 16 rows are 16 independent FMA chains
  const int64_t groups = W.zero_terms() ? W.G : 0;
  for (int j = 0; j < NP; ++j)
    for (int i = 0; i < MT; ++i) {
      const int64_t m0 = (mt0 + i) * 16, rows = std::min<int64_t>(16, A.M - m0);
      const float* tg = A.tg + m0 * W.G;
      __m512 v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_load_ps(acc[tile_id(i, j)] + 16 * r);
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 z = avx512_zs_row(W, g, (t + 2 * j) * 8);
        for (int r = 0; r < 16; ++r) v[r] = _mm512_fnmadd_ps(z, _mm512_set1_ps(tg[r * W.G + g]), v[r]);
      }
      for (int r = 0; r < rows; ++r) _mm512_storeu_ps(y + (m0 + r) * W.Np + (t + 2 * j) * 8, v[r]);
    }
}

template <WKind KIND>
void gemm_q8_t(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  const int kd = A.ablk >= 64 ? 64 : 32;  // activation blocks are 32, 64 or 128 columns
  const int64_t chunks = (W.Kp + kd - 1) / kd, per_block = A.ablk / kd, rows_total = chunks * kd / 4;
  const int64_t Mt = (A.M + 15) / 16;  // q, xs and tg have rows up to 16 * Mt (zero past M)
  const int np = Mt == 1 ? 4 : 2;  // tile pairs per step: four tile products in flight (2 x 2 from M = 32)
  thread_local std::vector<uint8_t> panel_store;
  panel_store.resize(static_cast<size_t>(64 * rows_total * np));
  configure(kd);
  for (int64_t t = t0; t < t1; t += 2 * np) {
    const int pairs = static_cast<int>(std::min<int64_t>(np, (t1 - t) / 2));
    const uint8_t* panels[4];
    for (int j = 0; j < pairs; ++j) {
      uint8_t* panel = panel_store.data() + 64 * rows_total * j;
      unpack_panel<KIND>(W, t + 2 * j, rows_total, panel);
      panels[j] = panel;
    }
    int64_t mt = 0;
    if (pairs == 1) {
      for (; mt + 4 <= Mt; mt += 4) block_tiles<KIND, 4, 1>(W, A, y, t, mt, panels, kd, per_block, chunks);
      for (; mt + 2 <= Mt; mt += 2) block_tiles<KIND, 2, 1>(W, A, y, t, mt, panels, kd, per_block, chunks);
      for (; mt < Mt; ++mt) block_tiles<KIND, 1, 1>(W, A, y, t, mt, panels, kd, per_block, chunks);
    } else if (pairs == 2) {
      for (; mt + 2 <= Mt; mt += 2) block_tiles<KIND, 2, 2>(W, A, y, t, mt, panels, kd, per_block, chunks);
      for (; mt < Mt; ++mt) block_tiles<KIND, 1, 2>(W, A, y, t, mt, panels, kd, per_block, chunks);
    } else {
      for (; mt < Mt; ++mt) {
        if (pairs == 4)
          block_tiles<KIND, 1, 4>(W, A, y, t, mt, panels, kd, per_block, chunks);
        else
          block_tiles<KIND, 1, 3>(W, A, y, t, mt, panels, kd, per_block, chunks);
      }
    }
  }
  _tile_release();
}

#undef COMPRESSOR_TILE_DOT

// int2 / int3 take the AVX-512 table's kernel (the AMX B panels are unpacked for int4 and int8 only)
void gemm_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  if (is_low_bit(W.kind)) return avx512_kernels()->gemm_q8(W, A, y, t0, t1);
  if (W.kind == WKind::Int4)
    gemm_q8_t<WKind::Int4>(W, A, y, t0, t1);
  else
    gemm_q8_t<WKind::Int8>(W, A, y, t0, t1);
}

}  // namespace

const KernelTable* amx_kernels() {
  static const KernelTable table = [] {
    const KernelTable* base = avx512_kernels();
    if (!base) return KernelTable{};
    KernelTable t = *base;
    t.name = "amx";
    t.gemm_q8 = gemm_q8;
    return t;
  }();
  return table.name ? &table : nullptr;
}

}  // namespace compressor

#else

namespace compressor {
const KernelTable* amx_kernels() { return nullptr; }
}  // namespace compressor

#endif
