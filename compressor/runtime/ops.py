"""Weight-only quantized matmuls: the C++ extension's ops (`torch.ops.compressor.*`) on repacked weights, and the
pure-torch reference (dequantize, then matmul) used as fallback when the extension is not built and in tests."""

from __future__ import annotations

import torch

from ..quant.packing import unpack_int32, unpack_zero_points
from ..quant.rtn import dequantize
from ._ext import extension_available
from .repack import PackedWeight

# mode argument of the ops: 0 auto (int8 activations + integer dot products for M < 16, float32 GEMM above),
# 1 float32 activations and accumulation for every M, 2 int8 activations for every M (INT weights only)
MODE_AUTO, MODE_FLOAT, MODE_INT8 = 0, 1, 2
# user-facing names of the modes (`compressor.load(path, activations=...)`)
ACTIVATION_MODES = {"float": MODE_FLOAT, "int8-decode": MODE_AUTO, "int8": MODE_INT8}


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_packed: torch.Tensor | None,
    bits: int,
    shape: tuple[int, int],
    group_size: int,
) -> torch.Tensor:
    """Float32 [N, K] weight from the pack-quantized tensors (ragged last group allowed): unpacked, `dequantize`d."""
    n, k = shape
    zero = None if zero_packed is None else unpack_zero_points(zero_packed, bits, n)
    return dequantize(unpack_int32(packed, bits, k), scale, zero, group_size)


def int_weight_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., K] @ weight[N, K]^T + bias, computed in float32, returned in x's dtype."""
    y = torch.nn.functional.linear(x.to(torch.float32), weight, None if bias is None else bias.float())
    return y.to(x.dtype)


def packed_matmul(x: torch.Tensor, p: PackedWeight, mode: int = MODE_AUTO) -> torch.Tensor:
    """x [M, K] (float32/bfloat16/float16) @ W^T with W in kernel layout -> float32 [M, N] (extension op)."""
    if not torch.compiler.is_compiling() and not extension_available():  # (torch.compile: checked when eager)
        raise RuntimeError("compressor._C is not built; reinstall with `pip install -e .` (or use the fallback)")
    ops = torch.ops.compressor
    if p.kind == "fp8":
        return ops.fp8_gemm(x, p.w, p.scale, p.group_size, p.out_features, mode)
    op = {"int2": ops.int2_gemm, "int3": ops.int3_gemm, "int4": ops.int4_gemm, "int8": ops.int8_gemm}[p.kind]
    return op(x, p.w, p.scale, p.zs, p.group_size, p.out_features, mode)


def add_correction(y: torch.Tensor, low: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y (float32 [M, N]) + up low, where low = down x [M, r]: a low-rank correction of the quantization error,
    in the factors' dtype (one fused multiply-add when that is float32)."""
    if up.dtype == torch.float32:
        return torch.addmm(y, low, up.t())
    return y + (low @ up.t()).to(torch.float32)


def dense16_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (float32/bfloat16/float16) @ weight^T (+ bias) for a bfloat16/float16 weight [N, K], every weight
    widened exactly and summed in float32 -> float32 [M, N] (extension op `dense16_gemm`, CPU)."""
    return torch.ops.compressor.dense16_gemm(x, weight, bias)
