// Op schemas (torch.ops.compressor.*), their CPU registrations, and the Python module stub `compressor._C`.
// Importing compressor._C runs the static registrations below; the ops are called through torch.ops.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

TORCH_LIBRARY(compressor, m) {
  m.def("int4_gemm(Tensor x, Tensor w, Tensor scales, Tensor? zeros, int group_size, int out_features, int mode=0)"
        " -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor w, Tensor scales, Tensor? zeros, int group_size, int out_features, int mode=0)"
        " -> Tensor");
  m.def("int2_gemm(Tensor x, Tensor w, Tensor scales, Tensor? zeros, int group_size, int out_features, int mode=0)"
        " -> Tensor");
  m.def("int3_gemm(Tensor x, Tensor w, Tensor scales, Tensor? zeros, int group_size, int out_features, int mode=0)"
        " -> Tensor");
  m.def("fp8_gemm(Tensor x, Tensor w, Tensor scales, int group_size, int out_features, int mode=0) -> Tensor");
  m.def("dense16_gemm(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("available_isas() -> str[]", &compressor::available_isas);
  m.def("isa() -> str", &compressor::current_isa);
  m.def("set_isa(str name) -> str", &compressor::set_isa);
  m.def("read_memory(Tensor buf) -> int");
}

TORCH_LIBRARY_IMPL(compressor, CPU, m) {
  m.impl("int4_gemm", &compressor::int4_gemm_cpu);
  m.impl("int8_gemm", &compressor::int8_gemm_cpu);
  m.impl("int2_gemm", &compressor::int2_gemm_cpu);
  m.impl("int3_gemm", &compressor::int3_gemm_cpu);
  m.impl("fp8_gemm", &compressor::fp8_gemm_cpu);
  m.impl("dense16_gemm", &compressor::dense16_gemm_cpu);
  m.impl("read_memory", &compressor::read_memory);
}

// The ops have no derivative (inference kernels, inputs that never require grad in compressor's models): the
// autograd keys fall through to the backend kernel. Without this every call went through torch's boxed
// "autograd not implemented" fallback, a measurable part of an M=1 call's fixed cost.
TORCH_LIBRARY_IMPL(compressor, Autograd, m) {
  for (const char* op : {"int4_gemm", "int8_gemm", "int2_gemm", "int3_gemm", "fp8_gemm", "dense16_gemm", "read_memory"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "compressor C++ kernels (ops under torch.ops.compressor)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
