// CUDA implementations of torch.ops.compressor.{int2,int3,int4,int8,fp8}_gemm on the same repacked layout as the CPU
// kernels (csrc/cpu/kernels.h: pairs of 8-row tiles in streams of 4 pairs, [Np/64, Kw, 64] 32-bit words; float32
// scales / z*s [G, Np]).
//   M < 16: GEMV, one warp per 8-row tile (32 lanes read 4 word blocks x 8 rows: four whole 32-byte sectors per
//           step, twelve for int3), float32 accumulation, lanes reduced with shuffles.
//   M >= 16: tensor-core GEMM (WMMA m16n16k16, fp16 for float16/float32 activations, bf16 for bfloat16), weights
//           dequantized into shared memory per 64x64x32 tile, float32 accumulation. FP8 E4M3 weights are
//           converted to fp16/bf16 the same way (no native FP8 MMA).
// Built by setup.py only with a CUDA build of torch and a toolkit; on our machines it is compile-checked with nvcc
// for sm_80 and sm_90a (.ci/run), never run.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace compressor_cuda {

enum Kind : int { kInt4 = 0, kInt8 = 1, kFp8 = 2, kInt2 = 3, kInt3 = 4 };

// Columns and words of a word block, the layout's unit along K (csrc/cpu/kernels.h: int3 is 32 columns in 3 words,
// two int2 words of low bits and one of high bits; the others one word of 8, 16 or 4 codes).
template <int KIND>
constexpr int block_cols() {
  return KIND == kInt4 ? 8 : KIND == kInt2 ? 16 : KIND == kInt3 ? 32 : 4;
}
template <int KIND>
constexpr int block_words() {
  return KIND == kInt3 ? 3 : 1;
}
// zero point of symmetric weights in the code domain
template <int KIND>
constexpr float code_offset() {
  return KIND == kInt4 ? 8.f : KIND == kInt2 ? 2.f : KIND == kInt3 ? 4.f : 0.f;
}

// Bit within byte j of the int3 high word for column 16w + 4j + r of a block (csrc/cpu/kernels.h, int3_high_bit)
__device__ __forceinline__ int int3_high_bit(int w, int r) { return r < 3 ? 2 + 2 * r + w : w; }

// Code i of a word block (its block_words words) as float: int4 / int2 / int3 u, int8 q, fp8 the E4M3 value.
template <int KIND>
__device__ __forceinline__ float decode(const uint32_t* words, int i) {
  if constexpr (KIND == kInt4) {
    return static_cast<float>((words[0] >> (4 * i)) & 0xF);
  } else if constexpr (KIND == kInt2) {
    return static_cast<float>((words[0] >> (2 * i)) & 3);
  } else if constexpr (KIND == kInt3) {
    const int w = i / 16, c = i % 16;
    const uint32_t low = (words[w] >> (2 * c)) & 3, high = (words[2] >> (8 * (c / 4) + int3_high_bit(w, c % 4))) & 1;
    return static_cast<float>(low + 4 * high);
  } else {
    const uint8_t b = static_cast<uint8_t>(words[0] >> (8 * i));
    if constexpr (KIND == kInt8) {
      return static_cast<float>(static_cast<int8_t>(b));
    } else {
      __nv_fp8_e4m3 f;
      f.__x = b;
      return static_cast<float>(f);
    }
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename C>
__device__ __forceinline__ C from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Shape {
  int64_t M, K, Kp, Kw, Np, G, group;
  float zoff;  // zero point of symmetric int weights (zs == nullptr): code_offset<KIND>()
  int stype;   // scale storage (csrc/cpu/kernels.h SType): 0 float32, 1 float16, 2 bfloat16
};

// Scale of group g, row n, widened to float32 (exact)
__device__ __forceinline__ float scale_at(const void* s, const Shape& S, int64_t g, int64_t n) {
  const int64_t i = g * S.Np + n;
  if (S.stype == 1) return __half2float(static_cast<const __half*>(s)[i]);
  if (S.stype == 2) return __bfloat162float(static_cast<const __nv_bfloat16*>(s)[i]);
  return static_cast<const float*>(s)[i];
}

// z * s of group g, row n: the stored value, or zoff * s for symmetric weights (exact)
__device__ __forceinline__ float zs_at(const void* s, const float* zs, const Shape& S, int64_t g, int64_t n) {
  return zs ? zs[g * S.Np + n] : S.zoff * scale_at(s, S, g, n);
}

__device__ __forceinline__ int64_t group_of(const Shape& S, int64_t k) {
  const int64_t g = k / S.group;
  return g < S.G ? g : S.G - 1;
}

// The layout's streams of 4 tile pairs (csrc/cpu/kernels.h): word kw of pair q is at pair_words(q) + kw * 64.
constexpr int64_t kStreamPairs = 4;
constexpr int64_t kStreamRows = 16 * kStreamPairs;
constexpr int64_t kPairWordStride = kStreamRows;

__device__ __forceinline__ const uint32_t* pair_words(const uint32_t* w, const Shape& S, int64_t q) {
  return w + (q / kStreamPairs) * S.Kw * kPairWordStride + (q % kStreamPairs) * 16;
}

// The words of word block kb of row n (loaded through the read-only cache)
template <int KIND>
__device__ __forceinline__ void load_block(const uint32_t* w, const Shape& S, int64_t n, int64_t kb,
                                           uint32_t (&words)[block_words<KIND>()]) {
  const uint32_t* row = pair_words(w, S, n / 16) + (n & 15);
#pragma unroll
  for (int i = 0; i < block_words<KIND>(); ++i)
    words[i] = __ldg(row + (kb * block_words<KIND>() + i) * kPairWordStride);
}

// Dequantized weight (row n, column k < Kp).
template <int KIND>
__device__ __forceinline__ float weight_at(const uint32_t* w, const void* s, const float* zs, const Shape& S, int64_t n,
                                           int64_t k) {
  constexpr int BC = block_cols<KIND>();
  uint32_t words[block_words<KIND>()];
  load_block<KIND>(w, S, n, k / BC, words);
  const int64_t g = group_of(S, k);
  const float c = decode<KIND>(words, static_cast<int>(k % BC));
  const float sc = scale_at(s, S, g, n);
  return KIND == kFp8 ? c * sc : c * sc - zs_at(s, zs, S, g, n);
}

// blockDim (32, 4): warp y handles tile blockIdx.x * 4 + y for activation row blockIdx.y.
template <int KIND, typename T>
__global__ void gemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ w, const void* __restrict__ s,
                            const float* __restrict__ zs, float* __restrict__ y, Shape S) {
  constexpr int BC = block_cols<KIND>();
  const int lane = threadIdx.x, j = lane & 7, sub = lane >> 3;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= S.Np / 8) return;
  const int64_t m = blockIdx.y, n = t * 8 + j;
  const T* xr = x + m * S.K;
  float acc = 0.f;
  for (int64_t kb = sub; kb < S.Kp / BC; kb += 4) {  // word blocks (one word except int3's 3)
    uint32_t words[block_words<KIND>()];
    load_block<KIND>(w, S, n, kb, words);
#pragma unroll
    for (int i = 0; i < BC; ++i) {
      const int64_t k = kb * BC + i;
      if (k >= S.K) break;
      const int64_t g = group_of(S, k);
      const float sc = scale_at(s, S, g, n);
      const float c = decode<KIND>(words, i);
      const float wv = KIND == kFp8 ? c * sc : c * sc - zs_at(s, zs, S, g, n);
      acc += wv * to_float(xr[k]);
    }
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 8);
  acc += __shfl_xor_sync(0xffffffffu, acc, 16);
  if (sub == 0) y[m * S.Np + n] = acc;
}

constexpr int BM = 64, BN = 64, BK = 32;

// 128 threads = 4 warps in a 2 x 2 grid, each computing a 32 x 32 block of y with 2 x 2 WMMA fragments.
template <int KIND, typename T, typename C>
__global__ void __launch_bounds__(128) gemm_kernel(const T* __restrict__ x, const uint32_t* __restrict__ w,
                                                   const void* __restrict__ s, const float* __restrict__ zs,
                                                   float* __restrict__ y, Shape S) {
  using namespace nvcuda;
  __shared__ __align__(32) C As[BM * BK];  // x tile, row-major [m][k]
  __shared__ __align__(32) C Bs[BK * BN];  // W^T tile, row-major [k][n]
  __shared__ __align__(32) float Cs[BM * BN];
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.f);

  for (int64_t k0 = 0; k0 < S.Kp; k0 += BK) {
    for (int idx = tid; idx < BM * BK; idx += 128) {
      const int r = idx / BK, c = idx % BK;
      const int64_t m = m0 + r, k = k0 + c;
      As[idx] = from_float<C>(m < S.M && k < S.K ? to_float(x[m * S.K + k]) : 0.f);
    }
    for (int idx = tid; idx < BK * BN; idx += 128) {
      const int r = idx % BK, c = idx / BK;  // r: k, c: n (consecutive threads walk k: words of one row)
      const int64_t n = n0 + c, k = k0 + r;
      Bs[r * BN + c] = from_float<C>(n < S.Np && k < S.Kp ? weight_at<KIND>(w, s, zs, S, n, k) : 0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, C, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, C, wmma::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], As + (wm * 32 + a * 16) * BK + kk, BK);
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], Bs + kk * BN + wn * 32 + b * 16, BN);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wmma::store_matrix_sync(Cs + (wm * 32 + a * 16) * BN + wn * 32 + b * 16, acc[a][b], BN, wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < BM * BN; idx += 128) {
    const int64_t m = m0 + idx / BN, n = n0 + idx % BN;
    if (m < S.M && n < S.Np) y[m * S.Np + n] = Cs[idx];
  }
}

template <int KIND, typename T>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const float* zs, at::Tensor& y,
            const Shape& S) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  const void* sp = s.data_ptr();
  float* yp = y.data_ptr<float>();
  if (S.M < 16) {
    const dim3 grid(static_cast<unsigned>((S.Np / 8 + 3) / 4), static_cast<unsigned>(S.M)), block(32, 4);
    gemv_kernel<KIND, T><<<grid, block, 0, stream>>>(xp, wp, sp, zs, yp, S);
  } else {
    const dim3 grid(static_cast<unsigned>((S.Np + BN - 1) / BN), static_cast<unsigned>((S.M + BM - 1) / BM));
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      gemm_kernel<KIND, T, __nv_bfloat16><<<grid, 128, 0, stream>>>(xp, wp, sp, zs, yp, S);
    else
      gemm_kernel<KIND, T, __half><<<grid, 128, 0, stream>>>(xp, wp, sp, zs, yp, S);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int KIND>
at::Tensor run(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s, const at::Tensor* zs, int64_t group,
               int64_t out_features) {
  TORCH_CHECK(x_in.dim() == 2, "compressor ops: x must be [M, K]");
  TORCH_CHECK(w.is_cuda() && s.is_cuda() && w.device() == x_in.device() && s.device() == x_in.device(),
              "compressor ops: x, weight and scales must be on the same CUDA device");
  TORCH_CHECK(w.scalar_type() == at::kInt && w.dim() == 3 && w.size(2) == kPairWordStride && w.is_contiguous(),
              "compressor ops: packed weight must be the repacked int32 [Np/64, Kw, 64] layout");
  TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf || s.scalar_type() == at::kBFloat16) &&
                  s.dim() == 2 && s.is_contiguous(),
              "scales must be float32, float16 or bfloat16 [G, Np]");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int stype = s.scalar_type() == at::kHalf ? 1 : s.scalar_type() == at::kBFloat16 ? 2 : 0;
  Shape S{x.size(0), x.size(1), (x.size(1) + 31) / 32 * 32, 0, s.size(1), s.size(0), group, code_offset<KIND>(),
          stype};
  S.Kw = S.Kp / block_cols<KIND>() * block_words<KIND>();
  TORCH_CHECK(w.size(0) * kStreamRows == S.Np && w.size(1) == S.Kw && out_features <= S.Np,
              "weight layout does not match x");
  TORCH_CHECK(group > 0 && (S.G - 1) * group < S.K && S.G * group >= S.K, "group_size does not cover K");
  const float* zp = nullptr;
  if (KIND != kFp8 && zs) {  // none: symmetric weights
    TORCH_CHECK(zs->sizes() == s.sizes() && zs->scalar_type() == at::kFloat && zs->is_contiguous(),
                "zeros must be float32 [G, Np] like scales");
    zp = zs->data_ptr<float>();
  }
  at::Tensor y = at::zeros({S.M, S.Np}, x.options().dtype(at::kFloat));
  if (S.M == 0) return y.narrow(1, 0, out_features);
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<KIND, float>(x, w, s, zp, y, S);
      break;
    case at::kHalf:
      launch<KIND, __half>(x, w, s, zp, y, S);
      break;
    case at::kBFloat16:
      launch<KIND, __nv_bfloat16>(x, w, s, zp, y, S);
      break;
    default:
      TORCH_CHECK(false, "compressor ops: x must be float32, float16 or bfloat16");
  }
  return y.narrow(1, 0, out_features);
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& zs,
                     int64_t group, int64_t n, int64_t /*mode*/) {
  return run<kInt4>(x, w, s, zs ? &*zs : nullptr, group, n);
}
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& zs,
                     int64_t group, int64_t n, int64_t /*mode*/) {
  return run<kInt8>(x, w, s, zs ? &*zs : nullptr, group, n);
}
at::Tensor int2_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& zs,
                     int64_t group, int64_t n, int64_t /*mode*/) {
  return run<kInt2>(x, w, s, zs ? &*zs : nullptr, group, n);
}
at::Tensor int3_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& zs,
                     int64_t group, int64_t n, int64_t /*mode*/) {
  return run<kInt3>(x, w, s, zs ? &*zs : nullptr, group, n);
}
at::Tensor fp8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t group, int64_t n,
                    int64_t /*mode*/) {
  return run<kFp8>(x, w, s, nullptr, group, n);
}

}  // namespace compressor_cuda

TORCH_LIBRARY_IMPL(compressor, CUDA, m) {
  m.impl("int4_gemm", &compressor_cuda::int4_gemm);
  m.impl("int8_gemm", &compressor_cuda::int8_gemm);
  m.impl("int2_gemm", &compressor_cuda::int2_gemm);
  m.impl("int3_gemm", &compressor_cuda::int3_gemm);
  m.impl("fp8_gemm", &compressor_cuda::fp8_gemm);
}
