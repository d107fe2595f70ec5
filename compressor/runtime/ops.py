"""Weight-only quantized matmuls. Pure-torch reference implementations (the C++ extension plugs in here)."""

from __future__ import annotations

import torch

from ..quant.packing import unpack_int32
from ..quant.rtn import dequantize


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_packed: torch.Tensor | None,
    bits: int,
    shape: tuple[int, int],
    group_size: int,
) -> torch.Tensor:
    """Float32 [N, K] weight from the pack-quantized tensors (ragged last group allowed)."""
    n, k = shape
    codes = unpack_int32(packed, bits, k)
    zero = None
    if zero_packed is not None:
        zero = unpack_int32(zero_packed.t().contiguous(), bits, n).t()
    return dequantize(codes, scale, zero, group_size)


def int_weight_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., K] @ weight[N, K]^T + bias, computed in float32, returned in x's dtype."""
    y = torch.nn.functional.linear(x.to(torch.float32), weight, None if bias is None else bias.float())
    return y.to(x.dtype)
