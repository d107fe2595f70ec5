// CPU entry points of the ops (registered in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "kernels.h"

namespace compressor {

std::vector<std::string> available_isas();
std::string current_isa();
std::string set_isa(const std::string& name);  // returns the previous ISA

// mode: 0 auto (int8 activations for M < 16 when the group allows, else float32), 1 float32 accumulation,
// 2 int8-activation GEMV, 3 float32 GEMV, 4 blocked float32 GEMM (2-4 force one kernel; used by tests).
at::Tensor int4_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t group_size, int64_t out_features, int64_t mode);
at::Tensor int8_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t group_size, int64_t out_features, int64_t mode);
at::Tensor fp8_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group_size,
                        int64_t out_features, int64_t mode);

}  // namespace compressor
