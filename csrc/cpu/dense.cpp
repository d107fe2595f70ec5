// CPU entry point of dense16_gemm (registered in csrc/ops.cpp): y = x w^T (+ bias) for a bfloat16 / float16 weight
// kept as the artifact stores it (kernels_dense.h). Checks the arguments, makes float32 activations padded to whole
// 16-column steps when needed, picks the kernels of the active ISA and splits the weight rows over the threads.
#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "dispatch.h"
#include "kernels_dense.h"

namespace compressor {
namespace {

// The dense kernels of the active ISA (COMPRESSOR_ISA / set_isa included): AMX machines run the AVX-512 ones.
DenseKernel active_dense_kernel() {
  const std::string isa = current_isa();
  DenseKernel kernel = nullptr;
  if (isa == "avx512" || isa == "amx") kernel = dense_avx512_kernel();
  if (isa == "avx2") kernel = dense_avx2_kernel();
  return kernel ? kernel : dense_scalar_kernel();
}

}  // namespace

at::Tensor dense16_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "dense16_gemm: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "dense16_gemm: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK((w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf) && w.dim() == 2 && w.is_contiguous(),
              "dense16_gemm: w must be a contiguous bfloat16 or float16 [N, K] tensor, got ", w.scalar_type(), " ",
              w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "dense16_gemm: w [", w.sizes(), "] does not match x [", x.sizes(), "]");
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point(),
                "dense16_gemm: bias must be a float [", N, "] tensor, got ", bias->scalar_type(), " ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  // the kernels load whole 16-column steps of x: zeros past K (a row's next values could be inf or NaN)
  const int64_t Kp = (K + kDenseChains - 1) / kDenseChains * kDenseChains;
  at::Tensor xf = x;
  if (x.scalar_type() != at::kFloat || !x.is_contiguous() || Kp != K) {
    xf = at::zeros({M, Kp}, x.options().dtype(at::kFloat));
    xf.narrow(1, 0, K).copy_(x);
  }
  Dense16 D{};
  D.w = reinterpret_cast<const uint16_t*>(w.data_ptr());
  D.half = w.scalar_type() == at::kBFloat16 ? Half::BF16 : Half::F16;
  D.x = xf.data_ptr<float>();
  D.bias = bias ? b.data_ptr<float>() : nullptr;
  D.y = y.data_ptr<float>();
  D.M = M;
  D.N = N;
  D.K = K;
  D.ldx = Kp;
  const DenseKernel kernel = active_dense_kernel();
  parallel_chunks((N + kDenseUnit - 1) / kDenseUnit, [&](int64_t u0, int64_t u1) {
    kernel(D, u0 * kDenseUnit, std::min(u1 * kDenseUnit, N));
  });
  return y;
}

}  // namespace compressor
