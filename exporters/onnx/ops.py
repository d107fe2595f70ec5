"""Torch custom ops that stand for the ONNX quantized operators during `torch.onnx.export`, and their translations.

Each op has an eager reference implementation (so a swapped model still runs in torch and can be checked against
`compressor.load`), a fake implementation for tracing, and an onnxscript translation that emits exactly one ONNX
operator pattern: `com.microsoft.MatMulNBits`, `DequantizeLinear` + `MatMul`, or `com.microsoft.GatherBlockQuantized`.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from .weights import _unpack_low_first

_MSFT = Opset("com.microsoft", 1)
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _contrib_schema(name: str, inputs: list[tuple[str, str, bool]], attrs: list[str], types: dict) -> OpSchema:
    """An onnx OpSchema for a com.microsoft contrib op (onnx itself registers none; onnxscript needs one)."""
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    return OpSchema(
        name,
        _MSFT.domain,
        1,
        inputs=[OpSchema.FormalParameter(n, t, param_option=opt if o else single) for n, t, o in inputs],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[(t, allowed, "") for t, allowed in types.items()],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=False) for a in attrs],
    )


MATMUL_NBITS = Op(
    _MSFT,
    "MatMulNBits",
    _contrib_schema(
        "MatMulNBits",
        [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True)]
        + [("g_idx", "T4", True), ("bias", "T1", True)],
        ["K", "N", "bits", "block_size", "accuracy_level"],
        {"T1": _FLOATS, "T2": ["tensor(uint8)"], "T3": ["tensor(uint8)", *_FLOATS], "T4": ["tensor(int32)"]},
    ),
)
GATHER_BLOCK_QUANTIZED = Op(
    _MSFT,
    "GatherBlockQuantized",
    _contrib_schema(
        "GatherBlockQuantized",
        [("data", "T2", False), ("indices", "Tind", False), ("scales", "T1", False), ("zero_points", "T2", True)],
        ["bits", "block_size", "gather_axis", "quantize_axis"],
        {"T1": _FLOATS, "T2": ["tensor(uint8)"], "Tind": ["tensor(int32)", "tensor(int64)"]},
    ),
)


def _nbits_dequant(b: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None, k: int, bits: int) -> torch.Tensor:
    """Float [N, K] from MatMulNBits tensors (reference)."""
    n, k_blocks, _ = b.shape
    u = _unpack_low_first(b, bits).to(torch.float32)  # [N, k_blocks, block]
    if zp is None:
        z = torch.full((n, k_blocks, 1), float(1 << (bits - 1)))
    else:
        z = _unpack_low_first(zp, bits)[:, :k_blocks].to(torch.float32).unsqueeze(-1)
    w = (u - z) * scales.reshape(n, k_blocks, 1).to(torch.float32)
    return w.reshape(n, -1)[:, :k]


@torch.library.custom_op("compressor_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """x [.., K] @ dequant(B)^T (+ bias), MatMulNBits semantics."""
    return torch.nn.functional.linear(x, _nbits_dequant(b, scales, zero_points, k, bits).to(x.dtype), bias)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, k, n, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


def matmul_nbits_onnx(x, b, scales, zero_points, bias, k: int, n: int, bits: int, block_size: int, accuracy_level: int):
    return MATMUL_NBITS(
        x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level
    )


def _dq(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, axis: int, block_size: int) -> torch.Tensor:
    """DequantizeLinear (opset 21) reference for a 2-D weight: per tensor, per axis, or blocked along `axis`."""
    q = w.to(torch.float32)
    s = scale.to(torch.float32)
    z = None if zero is None else zero.to(torch.float32)
    if s.dim() == 0:
        return (q - (z if z is not None else 0)) * s
    if block_size:
        s = s.repeat_interleave(block_size, dim=axis).narrow(axis, 0, q.shape[axis])
        z = None if z is None else z.repeat_interleave(block_size, dim=axis).narrow(axis, 0, q.shape[axis])
    elif axis == 1:
        s, z = s.reshape(1, -1), (None if z is None else z.reshape(1, -1))
    else:
        s, z = s.reshape(-1, 1), (None if z is None else z.reshape(-1, 1))
    return (q - (z if z is not None else 0)) * s


@torch.library.custom_op("compressor_onnx::dq_matmul", mutates_args=())
def dq_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    axis: int,
    block_size: int,
) -> torch.Tensor:
    """x [.., K] @ DequantizeLinear(w [K, N]) (+ bias)."""
    y = x @ _dq(w, scale, zero, axis, block_size).to(x.dtype)
    return y if bias is None else y + bias


@dq_matmul.register_fake
def _(x, w, scale, zero, bias, axis, block_size):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


def dq_matmul_onnx(x, w, scale, zero, bias, axis: int, block_size: int):
    if block_size:
        weight = op.DequantizeLinear(w, scale, zero, axis=axis, block_size=block_size)
    else:
        weight = op.DequantizeLinear(w, scale, zero, axis=axis)
    y = op.MatMul(x, weight)
    return y if bias is None else op.Add(y, bias)


@torch.library.custom_op("compressor_onnx::gather_block_quantized", mutates_args=())
def gather_block_quantized(
    data: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, hidden: int
) -> torch.Tensor:
    """Rows `ids` of a [V, H] table packed like MatMulNBits' B (uint8, low bits first), symmetric zero point."""
    v = data.shape[0]
    table = _nbits_dequant(data.reshape(v, scales.shape[1], -1), scales, None, hidden, bits)
    return torch.nn.functional.embedding(ids, table)


@gather_block_quantized.register_fake
def _(data, ids, scales, bits, block_size, hidden):
    return scales.new_empty((*ids.shape, hidden))


def gather_block_quantized_onnx(data, ids, scales, bits: int, block_size: int, hidden: int):
    return GATHER_BLOCK_QUANTIZED(data, ids, scales, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)


TRANSLATIONS = {
    torch.ops.compressor_onnx.matmul_nbits.default: matmul_nbits_onnx,
    torch.ops.compressor_onnx.dq_matmul.default: dq_matmul_onnx,
    torch.ops.compressor_onnx.gather_block_quantized.default: gather_block_quantized_onnx,
}
