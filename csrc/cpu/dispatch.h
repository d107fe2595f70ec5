// CPU entry points of the ops (registered in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace compressor {

std::vector<std::string> available_isas();
std::string current_isa();
std::string set_isa(const std::string& name);  // returns the previous ISA

// Runs fn(b, e) over [0, n) on torch's threads the way the GEMM ops split their weight streams: owned shares taken
// in chunks of whole multiples of 4, work stealing, the contention guard (dispatch.cpp, for_each_chunk).
void parallel_chunks(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// XOR of every 64-bit word of buf, read by all threads (benchmarks measure read bandwidth with it).
int64_t read_memory(const at::Tensor& buf);

// mode: 0 auto (int8 activations for M < 16, float32 GEMM above), 1 float32 activations for every M,
// 2 int8 activations for every M, 3 float32 GEMV kernel, 4 blocked float32 GEMM kernel (3, 4: tests).
// int8 activations need an INT weight whose group size is a multiple of 32 (or one group); otherwise float32.
// zeros: z * s [G, Np], or none for symmetric weights (zero point = the code offset: 8 for int4, 0 for int8).
at::Tensor int4_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode);
at::Tensor int8_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode);
// int2 / int3: the same arguments on the low-bit layouts of kernels.h (zero point offsets 2 and 4).
at::Tensor int2_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode);
at::Tensor int3_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t out_features, int64_t mode);
// y = x w^T (+ bias) for a dense bfloat16 / float16 weight w [N, K] (kernels_dense.h; dense.cpp): float32 [M, N].
at::Tensor dense16_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
at::Tensor fp8_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                        int64_t out_features, int64_t mode);

}  // namespace compressor
