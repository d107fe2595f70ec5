// Shared declarations of the CPU kernels: the repacked weight layout, int8-quantized activations, and the
// per-ISA kernel table. Each ISA lives in its own translation unit compiled with its own flags.
//
// Weight layout (made once at load time by compressor/runtime/repack.py):
//   rows are grouped in tiles of 8, tile pairs of 16 and streams of kStreamPairs = 4 pairs (N padded to Np, a
//   multiple of 64); K padded to Kp, a multiple of 32.
//   w: [Np/64][Kw][4][16] 32-bit words; word (s, kw, p, j) holds row 64s+16p+j, columns kw*kpw .. kw*kpw+kpw-1:
//      word kw of a pair's 16 rows is one 64-byte line, and word kw of the 4 pairs of a stream are 4 consecutive
//      lines, so the 64 rows of a stream are read as one sequential stream (tile t = rows 8t..8t+7 is the low or
//      high half of each line of pair t/2; word kw of pair q is at pair_words(q) + kw * kPairWordStride)
//      int4: 8 unsigned nibbles u (value (u - z) * s), nibble i at bits 4i  -> kpw = 8
//      int8: 4 signed bytes q (value (q - z) * s), byte i at bits 8i         -> kpw = 4
//      fp8:  4 E4M3 bytes e (value e * s), byte i at bits 8i                  -> kpw = 4
//      int2: 16 unsigned 2-bit codes u (value (u - z) * s), code i at bits 2i -> kpw = 16 (the on-disk word)
//      int3: bit planes, 3 words per 32 columns (a word block; exactly 3 bits per weight): words 3b and 3b + 1
//            hold the low 2 bits of columns 32b .. 32b+15 and 32b+16 .. 32b+31 in the int2 layout, word 3b + 2
//            their high bits: the high bit of column 32b + 16w + 4j + r (w < 2, j < 4, r < 4) at bit
//            8j + int3_high_bit(w, r), i.e. byte j holds the 8 columns whose low bits sit in byte j of the two
//            low words, placed so that the int8-activation kernels move it next to a column's low bits with
//            one shift per 4 columns (kernels_avx512_q8.cpp); u = low + 4 * high
//      A word block is the layout's unit along K: block_cols columns in block_words words (kpw columns in one
//      word, except int3: 32 in 3).
//   s:  [G][Np] group scales (G groups of `group` columns along K, the last one may be shorter), stored as the
//       artifact's float16 or bfloat16 when it has them (half the scale bytes; 3% of an int4 g128 GEMV's reads,
//       6% at g64), else float32 (SType); kernels widen them exactly
//   zs: [G][Np] float32 z * s (int only; z = zero point in the code domain), or none for symmetric weights, whose
//       zero point is the code offset zoff (8 for int4, 2 for int2, 4 for int3, 0 for int8): kernels then use
//       zoff * s (exact: a power of two or zero times s, the value the stored z * s had), and read one stream
//       less; the int8-activation paths take the offset off their integer block sums instead
//       (Weights::fold_offset)
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace compressor {

enum class WKind : int { Int4 = 0, Int8 = 1, Fp8 = 2, Int2 = 3, Int3 = 4 };

// Storage type of the group scales.
enum class SType : int { F32 = 0, F16 = 1, BF16 = 2 };

// IEEE binary16 / bfloat16 bits -> float, exact (subnormals included; portable, for the scalar paths).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float mag = static_cast<float>(man) * 0x1p-24f;
    std::memcpy(&bits, &mag, sizeof bits);
    bits |= sign;
  } else {
    bits = sign | (exp == 31 ? 0x7F800000u : (exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Tile pairs per weight stream, and the distance in 32-bit words between words kw and kw + 1 of one pair. Until
// 2026-12-03 every pair was its own stream; the AVX-512 GEMV reads 4 pairs at a time, and from L3 4 streams
// read 15-20% slower than one (8 MiB, 2 threads, a C++ read-only probe: 44-56 us against 38-48 us).
constexpr int64_t kStreamPairs = 4;
constexpr int64_t kStreamRows = 16 * kStreamPairs;  // N is padded to a multiple of it
constexpr int64_t kPairWordStride = kStreamRows;     // one word per row of the stream between kw and kw + 1

// Software prefetch distance of the SIMD kernels in pair words (kPrefetchWords * 256 bytes of a stream: 8 KiB).
// Zen 5, int4 g128 AVX-512 GEMV, 2 threads, builds of 12 / 24 / 32 / 48 words timed interleaved in one process
// (docs/kernels.md, "Prefetch distance"): weights of about the L3's size called back to back (4096 x 14336,
// 14336 x 4096, 8192 x 8192) took 0.70-0.90x the time of 12 words at 32; L3-resident 4096 x 4096 the same at 12,
// 24 and 32 (5% slower at 48); cache-cold, 32 read 8% more of the probe's bandwidth in rounds where it read over
// 50 GB/s (80-90% instead of 74-83%) and the same in the others. (A one-shape C++ harness had picked 12 among
// 8 / 12 / 16.)
constexpr int64_t kPrefetchWords = 32;

// Columns and words of a word block (the layout's unit along K), and the code offset of symmetric int weights
// (the unsigned code of a zero weight: 2^(bits - 1); int8 codes are stored signed, offset 0).
constexpr int block_cols(WKind kind) {
  return kind == WKind::Int4 ? 8 : kind == WKind::Int2 ? 16 : kind == WKind::Int3 ? 32 : 4;
}
constexpr int block_words(WKind kind) { return kind == WKind::Int3 ? 3 : 1; }
constexpr float code_offset(WKind kind) {
  return kind == WKind::Int4 ? 8.f : kind == WKind::Int2 ? 2.f : kind == WKind::Int3 ? 4.f : 0.f;
}
constexpr bool is_low_bit(WKind kind) { return kind == WKind::Int2 || kind == WKind::Int3; }

// Codes per 32-bit word of a one-word-block kind (all but int3), as a compile-time constant.
template <WKind KIND>
constexpr int kpw() {
  static_assert(block_words(KIND) == 1, "int3 has 3 words per 32 columns: use block_cols / block_words");
  return block_cols(KIND);
}

// Bit (within byte j) of the int3 high-bit word that holds the high bit of column 16w + 4j + r of a 32-column
// block: w = 0 at 2, 4, 6 for r = 0, 1, 2 and at 0 for r = 3; w = 1 one bit above (3, 5, 7; 1). The AVX-512
// int8-activation GEMV takes column 4j + r of a low word in place as byte j of low & (3 << 2r) (r < 3; r = 3 as
// (low >> 2) & 0x30), so its high bit belongs at bit 2r + 2 (6 for r = 3): where the high word (w = 0) or the
// high word >> 1 (w = 1) has it for r < 3, and one shift away for r = 3.
constexpr int int3_high_bit(int w, int r) { return r < 3 ? 2 + 2 * r + w : w; }

// Order of the int8 activations within each 8 (int4) or 16 (int2, int3) columns, matching how the
// int8-activation kernels unpack a word (see QuantAct).
enum class ActPerm : int { None = 0, Int4 = 1, Int2 = 2 };
constexpr ActPerm act_perm(WKind kind) {
  return kind == WKind::Int4 ? ActPerm::Int4 : is_low_bit(kind) ? ActPerm::Int2 : ActPerm::None;
}

// Calls f(std::integral_constant<int, I>{}) for I = 0, 1, ..., N - 1 in order: a loop whose body can use its index
// as a compile-time constant (shift counts, accumulator chains).
template <int N, typename F>
inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

struct Weights {
  const uint32_t* w;
  const void* s;  // [G][Np] of stype
  SType stype;
  const float* zs;  // nullptr for fp8 and symmetric int weights
  WKind kind;
  float zoff;  // int: the zero point of symmetric weights in the code domain (code_offset(kind))
  int64_t N, Np, K, Kp, G, group;
  int64_t block_cols() const { return compressor::block_cols(kind); }
  int64_t block_words() const { return compressor::block_words(kind); }
  int64_t Kw() const { return Kp / block_cols() * block_words(); }
  // end of group g's columns (the last group runs to Kp)
  int64_t group_end(int64_t g) const { return g == G - 1 ? Kp : (g + 1) * group; }
  // the words of group g along K: [group_word_begin(g), group_word_end(g)), the last group running to Kw (SIMD
  // paths only: they need group % block_cols == 0 or a single group)
  int64_t group_word_begin(int64_t g) const { return g * group / block_cols() * block_words(); }
  int64_t group_word_end(int64_t g) const {
    return g == G - 1 ? Kw() : (g + 1) * group / block_cols() * block_words();
  }
  int64_t group_of(int64_t k) const {  // group index of column k
    int64_t g = k / group;
    return g < G ? g : G - 1;
  }
  int64_t scale_bytes() const { return stype == SType::F32 ? 4 : 2; }
  // scale of group g, row n, widened to float32
  float scale_at(int64_t g, int64_t n) const {
    const int64_t i = g * Np + n;
    if (stype == SType::F16) return half_bits_to_float(static_cast<const uint16_t*>(s)[i]);
    if (stype == SType::BF16) return bf16_bits_to_float(static_cast<const uint16_t*>(s)[i]);
    return static_cast<const float*>(s)[i];
  }
  // address of scale (g, n), for prefetches and vector loads
  const char* scale_addr(int64_t g, int64_t n) const {
    return static_cast<const char*>(s) + (g * Np + n) * scale_bytes();
  }
  // z * s of group g, row n (int weights)
  float zs_at(int64_t g, int64_t n) const { return zs ? zs[g * Np + n] : zoff * scale_at(g, n); }
  // Integer activation paths: the code offset taken off each block's exact dot product, sum (u - zoff) q =
  // sum u q - zoff * qsum in int32 (symmetric INT2/3/4; 0 otherwise), so that only asymmetric weights need z * s
  // terms after the blocks (zero_terms). Before 2026-12-03 symmetric INT4 took 8 * s * (group sums) off at the end: a
  // pass over every group's scales per row, and a large sum of u * x cancelled against it.
  int32_t fold_offset() const { return zs ? 0 : static_cast<int32_t>(zoff); }
  bool zero_terms() const { return zs != nullptr; }
  // the words of tile pair q (word kw of its 16 rows at kw * kPairWordStride + [0, 16)), of tile t (8 words there)
  const uint32_t* pair_words(int64_t q) const {
    return w + (q / kStreamPairs) * Kw() * kPairWordStride + (q % kStreamPairs) * 16;
  }
  const uint32_t* tile_words(int64_t t) const { return pair_words(t >> 1) + (t & 1) * 8; }
};

// Activations quantized to int8 per block of `ablk` columns (blocks never straddle a weight group).
// int4 (ActPerm::Int4): within each 8 columns the order is [0, 2, 4, 6, 1, 3, 5, 7] (matches the nibble unpack);
// int2 and int3 (ActPerm::Int2): column 4j + r of each 16 at position 4r + j (byte j of a low word's code r).
// For M >= 16, q, xs, qsum and tg have rows up to a multiple of 16 (zeros past M); q has a row stride
// ldq = Kp + 64 (rows 4 KiB apart would share L1 sets) and 64 bytes of slack, so 16-row tiles load whole.
struct QuantAct {
  const int8_t* q;      // [M or round_up(M, 16)][ldq] (+ 64 bytes)
  const float* xs;      // [M][NB] block scales
  const int32_t* qsum;  // [M][NB] block sums of q
  const float* tg;      // [M][G]  sum over blocks b of group g of xs_b * qsum_b (asymmetric weights; else 0)
  int64_t M, ablk, NB, ldq;
};

// Float activations zero-padded to Kp, plus per-group sums (for the zero-point term).
struct FloatAct {
  const float* x;     // [M][Kp]
  const float* xsum;  // [M][G]
  int64_t M;
};

// Each kernel computes y[m][n] (y is [M][Np] float32, zero-initialised) for the row tiles [t0, t1)
// (tiles of 8 rows; t0 and t1 multiples of 8: whole 4-pair streams, which the AVX-512 kernels take 4 pairs at a
// time). Single-threaded: the caller splits the streams across threads.
struct KernelTable {
  const char* name;
  // int weights x int8 activations (integer dot products per block), small M
  void (*gemv_q8)(const Weights&, const QuantAct&, float* y, int64_t t0, int64_t t1);
  // the same product for M >= 16 (AMX tiles, or register/cache-blocked SIMD; bit-identical to gemv_q8)
  void (*gemm_q8)(const Weights&, const QuantAct&, float* y, int64_t t0, int64_t t1);
  // int or fp8 weights x float activations, float32 accumulation, small M
  void (*gemv_f32)(const Weights&, const FloatAct&, float* y, int64_t t0, int64_t t1);
  // int or fp8 weights x float activations, blocked GEMM (dequantized weight panel + register-tiled FMA)
  void (*gemm_f32)(const Weights&, const FloatAct&, float* y, int64_t t0, int64_t t1);
  // int8 quantization of activation rows [m0, m1) of x [M][K] into q/xs/qsum (QuantAct layout; q zeroed by the
  // caller): per block absmax / 127, round to nearest even, columns in the order `perm`
  void (*quantize)(const float* x, int64_t K, int64_t Kp, int64_t ldq, int64_t ablk, ActPerm perm, int8_t* q,
                   float* xs, int32_t* qsum, int64_t m0, int64_t m1);
  // XOR of the 64-bit words of [p, p + bytes) (bytes a multiple of 256): a streaming read for bandwidth probes
  uint64_t (*read)(const uint8_t* p, int64_t bytes);
};

const KernelTable* scalar_kernels();
const KernelTable* avx2_kernels();    // nullptr when the TU was compiled without AVX2 support
const KernelTable* avx512_kernels();  // nullptr when the TU was compiled without AVX-512 support
const KernelTable* amx_kernels();     // nullptr without AMX-INT8 support in the build; the CPU check is the caller's
bool cpu_is_intel();                  // cpuid vendor GenuineIntel, read once (dispatch.cpp)

// Scalar reference pieces every table may reuse.
void scalar_quantize(const float* x, int64_t K, int64_t Kp, int64_t ldq, int64_t ablk, ActPerm perm, int8_t* q,
                     float* xs, int32_t* qsum, int64_t m0, int64_t m1);
// Position of column k in the activation order `perm` (QuantAct).
inline int64_t act_pos(ActPerm perm, int64_t k) {
  if (perm == ActPerm::Int4) {
    const int64_t i = k & 7;
    return (k & ~int64_t{7}) + ((i & 1) ? 4 + i / 2 : i / 2);
  }
  if (perm == ActPerm::Int2) return (k & ~int64_t{15}) + 4 * (k & 3) + ((k >> 2) & 3);
  return k;
}
uint64_t scalar_read(const uint8_t* p, int64_t bytes);

// E4M3 (fn) byte -> float, exact; NaN encodings (0x7f, 0xff) are not expected in weights.
float e4m3_to_float(uint8_t b);

constexpr int64_t kGemmKc = 256;  // K block of the GEMM panel (multiple of 8)

}  // namespace compressor
