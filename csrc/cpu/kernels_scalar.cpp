// Scalar reference kernels. Same arithmetic, in the same order, as the SIMD kernels (fmaf where they fuse),
// so the SIMD paths are tested against these for exact equality.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace compressor {

float e4m3_to_float(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

namespace {

// The stored code of row n, column k as a float: int4 / int2 / int3 u, int8 q, fp8 the E4M3 value.
inline float code(const Weights& W, int64_t n, int64_t k) {
  const uint32_t* row = W.pair_words(n / 16) + n % 16;  // word kw of row n at row[kw * kPairWordStride]
  auto word = [&](int64_t kw) { return row[kw * kPairWordStride]; };
  switch (W.kind) {
    case WKind::Int4:
      return static_cast<float>((word(k / 8) >> (4 * (k % 8))) & 0xF);
    case WKind::Int2:
      return static_cast<float>((word(k / 16) >> (2 * (k % 16))) & 3);
    case WKind::Int3: {
      const int64_t b = k / 32, w = (k % 32) / 16, i = k % 16;  // column i of low word w of block b
      const uint32_t low = (word(3 * b + w) >> (2 * i)) & 3;
      const uint32_t high = (word(3 * b + 2) >> (8 * (i / 4) + int3_high_bit(static_cast<int>(w), i % 4))) & 1;
      return static_cast<float>(low + 4 * high);
    }
    default:
      break;
  }
  const uint8_t byte = static_cast<uint8_t>(word(k / 4) >> (8 * (k % 4)));
  if (W.kind == WKind::Int8) return static_cast<float>(static_cast<int8_t>(byte));
  return e4m3_to_float(byte);
}

void gemv_q8(const Weights& W, const QuantAct& A, float* y, int64_t t0, int64_t t1) {
  const ActPerm perm = act_perm(W.kind);
  for (int64_t n = t0 * 8; n < t1 * 8; ++n) {
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* q = A.q + m * A.ldq;
      float acc = 0.f;
      for (int64_t b = 0; b < A.NB; ++b) {
        const int64_t k0 = b * A.ablk, k1 = std::min(k0 + A.ablk, W.Kp);
        int32_t d = 0;
        for (int64_t k = k0; k < k1; ++k) d += static_cast<int32_t>(code(W, n, k)) * q[act_pos(perm, k)];
        d -= W.fold_offset() * A.qsum[m * A.NB + b];
        const float sc = W.scale_at(W.group_of(k0), n) * A.xs[m * A.NB + b];
        acc = std::fmaf(static_cast<float>(d), sc, acc);
      }
      if (W.zero_terms())
        for (int64_t g = 0; g < W.G; ++g) acc = std::fmaf(-W.zs_at(g, n), A.tg[m * W.G + g], acc);
      y[m * W.Np + n] = acc;
    }
  }
}

// int4 / int2 / int3 codes are centred (u - zoff, exact) before the dot product and the zero-point term uses
// (z - zoff) * s: for symmetric layers (z = zoff) that term is exactly zero, so no large sum of u * x is cancelled
// against z * s * sum(x) (which cost about 3x the rounding error of a plain float32 matmul on a 30-layer model).
void gemv_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  const float off = code_offset(W.kind);
  for (int64_t n = t0 * 8; n < t1 * 8; ++n) {
    for (int64_t m = 0; m < X.M; ++m) {
      const float* x = X.x + m * W.Kp;
      float acc = 0.f;
      for (int64_t g = 0; g < W.G; ++g) {
        float chain[4] = {0.f, 0.f, 0.f, 0.f};  // column k goes to chain k % 4, summed in order at the group end
        for (int64_t k = g * W.group; k < W.group_end(g); ++k)
          chain[k % 4] = std::fmaf(code(W, n, k) - off, x[k], chain[k % 4]);
        const float ag = ((chain[0] + chain[1]) + chain[2]) + chain[3];
        const float s = W.scale_at(g, n);
        acc = std::fmaf(ag, s, acc);
        // (z - off) * s: zero for symmetric weights, which have no zs
        if (W.zs) acc = std::fmaf(-std::fmaf(-off, s, W.zs[g * W.Np + n]), X.xsum[m * W.G + g], acc);
      }
      y[m * W.Np + n] = acc;
    }
  }
}

void gemm_f32(const Weights& W, const FloatAct& X, float* y, int64_t t0, int64_t t1) {
  for (int64_t n = t0 * 8; n < t1 * 8; ++n) {
    for (int64_t m = 0; m < X.M; ++m) {
      const float* x = X.x + m * W.Kp;
      float acc = 0.f;
      for (int64_t k0 = 0; k0 < W.Kp; k0 += kGemmKc) {  // blocked summation, one partial sum per K panel
        float part = 0.f;
        for (int64_t k = k0; k < std::min(k0 + kGemmKc, W.Kp); ++k) {
          const int64_t g = W.group_of(k);
          const float s = W.scale_at(g, n);
          const float w = W.kind != WKind::Fp8 ? std::fmaf(code(W, n, k), s, -W.zs_at(g, n)) : code(W, n, k) * s;
          part = std::fmaf(x[k], w, part);
        }
        acc += part;
      }
      y[m * W.Np + n] = acc;
    }
  }
}

const KernelTable kTable{"scalar", gemv_q8, gemv_q8, gemv_f32, gemm_f32, scalar_quantize, scalar_read};

}  // namespace

void scalar_quantize(const float* x, int64_t K, int64_t Kp, int64_t ldq, int64_t ablk, ActPerm perm, int8_t* q,
                     float* xs, int32_t* qsum, int64_t m0, int64_t m1) {
  const int64_t NB = (Kp + ablk - 1) / ablk;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * ldq;
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t k0 = b * ablk, k1 = std::min(k0 + ablk, K);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xr[k] * inv));
        const int8_t c = static_cast<int8_t>(std::clamp(v, -127, 127));
        qr[act_pos(perm, k)] = c;
        sum += c;
      }
      xs[m * NB + b] = amax / 127.f;
      qsum[m * NB + b] = sum;
    }
  }
}

uint64_t scalar_read(const uint8_t* p, int64_t bytes) {
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < bytes; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, sizeof v);
      acc[j] ^= v;
    }
  uint64_t r = 0;
  for (uint64_t a : acc) r ^= a;
  return r;
}

const KernelTable* scalar_kernels() { return &kTable; }

}  // namespace compressor
