"""bfloat16 x bfloat16 -> float32 GEMM from the MKL inside torch's CPU build, for Gram matrices.

torch's CPU `mm` on bfloat16 returns bfloat16: the float32 accumulator is rounded to 8 mantissa bits once per
product, which perturbs a GPTQ Hessian enough to cost perplexity (measured on SmolLM2 W4 g64: 28.67 vs 28.16
with float32 products). MKL's `cblas_gemm_bf16bf16f32` keeps the float32 result (AMX / AVX512-BF16 where
present) and accumulates into it in place, at the speed of the bfloat16 product. It is looked up at run time;
builds without it (non-MKL torch, other platforms) fall back to a float32 product.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _gemm_bf16bf16f32():
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    fn.restype = None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p  # MKL_INT: 32-bit (LP64 interface)
    fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    return fn


def add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += x^T x for x [tokens, width]; h [width, width] float32. bfloat16 x: float32 products (no rounding
    of the result to bfloat16); other dtypes: a float32 product."""
    n, d = x.shape
    fn = _gemm_bf16bf16f32() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None
    if fn is None or not h.is_contiguous() or max(n, d) >= 2**31:
        h.addmm_(x.t().float(), x.float())
        return
    x = x.contiguous()
    fn(_ROW_MAJOR, _TRANS, _NO_TRANS, d, d, n, 1.0, x.data_ptr(), d, x.data_ptr(), d, 1.0, h.data_ptr(), d)
