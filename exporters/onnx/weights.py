"""Quantized weights of one layer and their ONNX layouts (pure tensor numerics, no graph code).

`LayerWeights` is what the plan (or an artifact's `QuantLinear` buffers) says a layer is: integer codes with
group scales and zero points, or FP8 E4M3 weights with scales. The functions below turn it, losslessly, into the
tensors of `com.microsoft.MatMulNBits`, of opset-21 blocked `DequantizeLinear` (int4/int8 codes in [K, N]), or of
FP8 `DequantizeLinear`. No value is re-quantized: codes are copied, scales only widened to float32 or repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor.plan import QuantizedWeight
from compressor.quant.formats import SCALE_DTYPES, Fp8Format
from compressor.quant.fp8 import expand_blocks, fp8_dequantize
from compressor.quant.packing import unpack_int32, unpack_zero_points
from compressor.quant.rtn import dequantize, expand_groups

NBITS_BLOCK_MAX = 128  # largest MatMulNBits block chosen when a layer's group is wider (channel-wise scales)


@dataclass
class LayerWeights:
    """One quantized [N, K] weight: int codes (+ scales [N, G], zero points [N, G]) or FP8 weights (+ scales)."""

    codes: torch.Tensor  # int8 codes in [-2^(b-1), 2^(b-1)-1], or float8_e4m3fn weights
    scale: torch.Tensor  # int: [N, G] in the artifact's scale dtype; fp8: float32 [1] | [N, 1] | [nb, kb]
    zero: torch.Tensor | None  # int8 signed zero points [N, G] (asymmetric int) or None
    bits: int
    group: int | None  # int: columns per scale group (K for channel-wise); fp8: None
    fp8_block: tuple[int, int] | None = None  # fp8 2-D block shape

    @property
    def is_fp8(self) -> bool:
        return self.codes.dtype == torch.float8_e4m3fn

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight (reference for every layout below)."""
        if self.is_fp8:
            strategy = "block" if self.fp8_block is not None else "channel" if self.scale.numel() > 1 else "tensor"
            return fp8_dequantize(self.codes, self.scale, Fp8Format(strategy, self.fp8_block or (128, 128)))
        return dequantize(self.codes, self.scale, self.zero, self.group)


def from_plan(qw: QuantizedWeight) -> LayerWeights:
    """The layer as the safetensors exporter writes it (scales in the artifact's scale dtype)."""
    if isinstance(qw.fmt, Fp8Format):
        block = tuple(qw.fmt.block) if qw.fmt.strategy == "block" else None
        return LayerWeights(qw.codes, qw.scale.to(torch.float32), None, 8, None, block)  # type: ignore[arg-type]
    k = qw.codes.shape[1]
    scale = qw.scale.to(SCALE_DTYPES[qw.scale_dtype])
    zero = None if qw.zero is None else qw.zero.to(torch.int8)
    return LayerWeights(qw.codes.to(torch.int8), scale, zero, qw.fmt.bits, qw.fmt.effective_group(k))


def from_buffers(module: torch.nn.Module) -> LayerWeights:
    """The layer held by a `compressor.load` QuantLinear/QuantEmbedding (its compressed-tensors buffers)."""
    s = module.scheme
    if s["type"] == "float":
        fmt = Fp8Format.of_scheme(s)
        block = fmt.block if fmt.strategy == "block" else None
        return LayerWeights(module.weight, module.weight_scale.to(torch.float32), None, 8, None, block)
    n, k = (int(v) for v in module.weight_shape.tolist())
    bits = int(s["num_bits"])
    codes = unpack_int32(module.weight_packed, bits, k)
    group = k if s["strategy"] == "channel" or not s.get("group_size") else int(s["group_size"])
    zp = getattr(module, "weight_zero_point", None)
    zero = None if zp is None else unpack_zero_points(zp, bits, n).contiguous()
    return LayerWeights(codes, module.weight_scale, zero, bits, group)


# ---- MatMulNBits -------------------------------------------------------------------------------------------


def nbits_block_size(
    lw: LayerWeights, bits_allowed: tuple[int, ...] = (2, 4, 8), max_block: int | None = None
) -> int | None:
    """MatMulNBits block size that represents this layer exactly, or None (the layer falls back to QDQ).

    Blocks must be powers of two >= 16; a block smaller than the layer's group repeats the group's scale, so
    any group (channel-wise included) whose width and K share a power-of-two factor >= 16 maps losslessly.
    `max_block` (a power of two >= 16) caps the block: at accuracy_level 4 onnxruntime quantizes activations per
    block, so smaller blocks give more accurate activations for more scale bytes.
    """
    if lw.is_fp8 or lw.bits not in bits_allowed:
        return None
    k = lw.shape[1]
    common = math.gcd(lw.group, k)
    block = common & -common  # largest power of two dividing both
    block = min(block, NBITS_BLOCK_MAX if lw.group > NBITS_BLOCK_MAX else lw.group)
    if max_block is not None:
        block = min(block, max_block)
    return block if block >= 16 else None


def _pack_low_first(u: torch.Tensor, bits: int) -> torch.Tensor:
    """uint values [..., L] (L * bits divisible by 8) -> uint8 [..., L * bits / 8], low bits first."""
    per = 8 // bits
    u = u.to(torch.int32).reshape(*u.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (u << shifts).sum(-1).to(torch.uint8)


def _unpack_low_first(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(*packed.shape[:-1], -1)


def nbits_tensors(lw: LayerWeights, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B uint8 [N, k_blocks, block*bits/8], scales float32 [N, k_blocks], packed zero points or None).

    Signed codes q map to unsigned q + 2^(b-1); zero points likewise (absent for symmetric layers: MatMulNBits'
    default zero point is 2^(b-1)). Zero points are packed like B along k_blocks: [N, ceil(k_blocks*bits/8)].
    """
    n, k = lw.shape
    bits, offset = lw.bits, 1 << (lw.bits - 1)
    k_blocks = math.ceil(k / block)
    pad = k_blocks * block - k
    u = lw.codes.to(torch.int32) + offset
    reps = lw.group // block
    scales = expand_groups(lw.scale.to(torch.float32), k_blocks, reps).contiguous()  # a group = reps blocks
    zp = None
    if lw.zero is not None:
        zu = expand_groups(lw.zero.to(torch.int32), k_blocks, reps) + offset
        per = 8 // bits
        zu = torch.nn.functional.pad(zu, (0, (-k_blocks) % per), value=0)
        zp = _pack_low_first(zu, bits)
    if pad:  # unreachable for blocks dividing K; kept so a ragged K packs (the kernel reads only K columns)
        u = torch.nn.functional.pad(u, (0, pad), value=offset)
    b = _pack_low_first(u.reshape(n, k_blocks, block), bits)
    return b.contiguous(), scales, zp


def nbits_codes(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Signed int8 codes [N, K] back from a MatMulNBits B tensor (tests compare them with the artifact)."""
    u = _unpack_low_first(b, bits).reshape(b.shape[0], -1)[:, :k]
    return (u - (1 << (bits - 1))).to(torch.int8)


def nbits_zero_points(zp: torch.Tensor, bits: int, k_blocks: int) -> torch.Tensor:
    """Signed int8 zero points [N, k_blocks] back from MatMulNBits' packed zero points."""
    u = _unpack_low_first(zp, bits)[:, :k_blocks]
    return (u - (1 << (bits - 1))).to(torch.int8)


# ---- DequantizeLinear (opset 21) --------------------------------------------------------------------------


@dataclass
class QdqTensors:
    """Inputs of DequantizeLinear(weight, scale, zero, axis, block_size) producing the float [K, N] weight."""

    weight: torch.Tensor  # int8 codes (stored as INT4 when onnx_int4) or float8 [K, N]
    scale: torch.Tensor  # float32: [] | [N] | [ceil(K/block), N]
    zero: torch.Tensor | None  # int8 [ceil(K/block), N] (as INT4 when onnx_int4)
    axis: int
    block_size: int  # 0: no blocking (per tensor / per axis)
    onnx_int4: bool


def qdq_tensors(lw: LayerWeights) -> QdqTensors:
    """Blocked DequantizeLinear tensors: int codes -> int4 (bits <= 4) or int8; FP8 -> float8e4m3fn."""
    n, k = lw.shape
    wt = lw.codes.t().contiguous()
    if lw.is_fp8:
        s = lw.scale.to(torch.float32)
        if lw.fp8_block is not None:  # 2-D blocks -> blocks along K, the block row's scale repeated over N
            bn, bk = lw.fp8_block
            s = expand_blocks(s, (n, s.shape[1]), (bn, 1)).t().contiguous()
            return QdqTensors(wt, s, None, 0, bk, False)
        if s.numel() == 1:
            return QdqTensors(wt, s.reshape(()), None, 0, 0, False)
        return QdqTensors(wt, s.reshape(n).contiguous(), None, 1, 0, False)
    scale = lw.scale.to(torch.float32).t().contiguous()
    zero = None if lw.zero is None else lw.zero.to(torch.int8).t().contiguous()
    if lw.group >= k:  # channel-wise: per-axis scales over N
        zero = None if zero is None else zero.reshape(n)
        return QdqTensors(wt, scale.reshape(n), zero, 1, 0, lw.bits <= 4)
    return QdqTensors(wt, scale, zero, 0, lw.group, lw.bits <= 4)
