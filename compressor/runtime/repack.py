"""Repack compressed-tensors weights (on-disk layout) into the kernels' tiled layout, once at load time.

Kernel layout (see csrc/cpu/kernels.h): rows in pairs of 8-row tiles and streams of 4 pairs (N padded to a multiple
of 64), K padded to a multiple of 32, tensor [Np/64, Kw, 64] int32 where word (s, kw, 16p+j) holds row 64s+16p+j's
codes for columns kw*c .. kw*c+c-1 (c = 8 for int4, 16 for int2, 4 for int8/fp8) -- the on-disk pack-quantized
words, transposed per 64 rows, so that word kw of a pair's 16 rows is one 64-byte line, word kw of the 4 pairs of a
stream 4 consecutive lines, and 64 rows one sequential stream. Scales become [G, Np] in the narrowest of float16 /
bfloat16 / float32 that holds them exactly (an artifact's 16-bit scales stay 16-bit: half the scale bytes a GEMV
reads); zero points become float32 z * s in the code domain ([G, Np]), so w = code * s - zs.
Symmetric weights have no zs: their zero point is the code offset (8 for int4, 2 for int2, 4 for int3, 0 for int8)
and the kernels use offset * s, which is exact.

INT3 words are bit planes, 3 words per 32 columns (exactly 3 bits per weight; `_int3_words`): the low 2 bits of
columns 0-15 and 16-31 as two int2 words, then a word with the 32 high bits in the order the SIMD kernels unpack them
(csrc/cpu/kernels.h, int3_high_bit). The on-disk 3-bit stream (codes straddling words) is unpacked and re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.fp8 import expand_blocks
from ..quant.packing import unpack_int32, unpack_zero_points


@dataclass(frozen=True)
class PackedWeight:
    """A weight in kernel layout. kind: 'int2' | 'int3' | 'int4' | 'int8' | 'fp8'."""

    kind: str
    w: torch.Tensor  # int32 [Np/64, Kw, 64]
    scale: torch.Tensor  # float16 / bfloat16 / float32 [G, Np] (kernel_scale_dtype)
    zs: torch.Tensor | None  # float32 [G, Np] (asymmetric int kinds; None: symmetric or fp8)
    group_size: int
    out_features: int
    in_features: int


STREAM_ROWS = 64  # rows per weight stream (4 tile pairs); N is padded to a multiple of it


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _tile(words: torch.Tensor, n: int, kw: int) -> torch.Tensor:
    """int32 words [N, W] -> [Np/64, Kw, 64] (zero padded): word (s, kw, 16p + j) = words[64s + 16p + j, kw]."""
    np_ = _round_up(n, STREAM_ROWS)
    out = torch.zeros(np_, kw, dtype=torch.int32, device=words.device)
    out[:n, : words.shape[1]] = words[:, :kw]
    return out.reshape(np_ // STREAM_ROWS, STREAM_ROWS, kw).transpose(1, 2).contiguous()


def kernel_scale_dtype(scale: torch.Tensor) -> torch.dtype:
    """The narrowest of float16 / bfloat16 / float32 that holds every value of `scale` exactly (the kernels widen
    16-bit scales to float32 without rounding, so results do not depend on the storage)."""
    if scale.dtype in (torch.float16, torch.bfloat16):
        return scale.dtype
    s = scale.to(torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        if torch.equal(s.to(dtype).to(torch.float32), s):
            return dtype
    return torch.float32


def _per_group(t: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, G] -> [G, Np] of dtype (zero padded rows)."""
    out = torch.zeros(t.shape[1], _round_up(n, STREAM_ROWS), dtype=dtype, device=t.device)
    out[:, :n] = t.to(dtype).t()
    return out.contiguous()


def _int3_high_bit(w: int, r: int) -> int:
    """Bit within byte j of an int3 high word of column 16w + 4j + r of a 32-column block (kernels.h)."""
    return 2 + 2 * r + w if r < 3 else w


# bit of the high word for each column c of a 32-column block: byte j = (c % 16) // 4, then int3_high_bit
_INT3_HIGH_BITS = [8 * ((c % 16) // 4) + _int3_high_bit(c // 16, c % 4) for c in range(32)]


def _int3_words(packed: torch.Tensor, n: int, k: int, kp: int) -> torch.Tensor:
    """The INT3 kernel words [N, 3 Kp / 32] of pack-quantized 3-bit codes: per 32 columns two int2 words of the low
    bits, then one of the high bits (zero codes past K: the kernels' activations are zero there)."""
    u = torch.zeros(n, kp, dtype=torch.int64, device=packed.device)
    u[:, :k] = unpack_int32(packed, 3, k).to(torch.int64) + 4  # offset-binary codes
    blocks = u.reshape(n, kp // 32, 32)
    low_shifts = 2 * torch.arange(16, device=u.device).repeat(2)
    low = ((blocks & 3) << low_shifts).reshape(n, kp // 32, 2, 16).sum(-1)
    high_shifts = torch.tensor(_INT3_HIGH_BITS, device=u.device)
    high = ((blocks >> 2) << high_shifts).sum(-1, keepdim=True)
    words = torch.cat([low, high], -1).reshape(n, kp // 32 * 3)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def repack_int(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_packed: torch.Tensor | None,
    bits: int,
    shape: tuple[int, int],
    group_size: int,
) -> PackedWeight:
    """Kernel layout of a pack-quantized INT2/INT3/INT4/INT8 weight [N, K] (codes offset-binary on disk)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"kernels support 2-, 3-, 4- and 8-bit weights, got {bits}")
    n, k = shape
    kp = _round_up(k, 32)
    # 2, 4 and 8 bits: the on-disk words (no code straddles two); 3 bits: re-encoded as bit planes
    words = _int3_words(packed, n, k, kp) if bits == 3 else packed.to(torch.int32)
    if bits == 8:  # offset-binary u = q + 128 -> signed q in every byte
        words = words ^ -0x7F7F7F80  # 0x80808080
    w = _tile(words, n, kp * bits // 32)
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    s = _per_group(scale.reshape(n, -1), n, kernel_scale_dtype(scale))
    zs = None  # symmetric: the kernels use the code offset (int2-4 codes stay unsigned, u = q + 2^(bits-1); int8
    # codes are signed)
    if zero_packed is not None:
        offset = 0 if bits == 8 else 1 << (bits - 1)
        z = unpack_zero_points(zero_packed, bits, n).to(torch.float32) + offset
        zs = s.to(torch.float32) * _per_group(z, n)
    return PackedWeight(f"int{bits}", w, s, zs, group_size if s.shape[0] > 1 else k, n, k)


def repack_fp8(weight: torch.Tensor, scale: torch.Tensor, strategy: str, block: tuple[int, int]) -> PackedWeight:
    """Kernel layout of a float8_e4m3fn weight [N, K] with per-tensor, per-channel or [bn, bk] block scales."""
    n, k = weight.shape
    kp = _round_up(k, 32)
    raw = torch.zeros(n, kp, dtype=torch.uint8, device=weight.device)
    raw[:, :k] = weight.view(torch.uint8)
    words = raw.view(torch.int32)  # little endian: byte i of a word is column 4*kw + i
    w = _tile(words, n, kp // 4)
    dtype = kernel_scale_dtype(scale)
    scale = scale.to(torch.float32)
    if strategy == "block":
        rows = expand_blocks(scale, (n, scale.shape[1]), (block[0], 1))  # [N, Gk]: each block row's scales
        return PackedWeight("fp8", w, _per_group(rows, n, dtype), None, block[1] if rows.shape[1] > 1 else k, n, k)
    rows = scale.reshape(-1, 1).expand(n, 1) if scale.numel() == 1 else scale.reshape(n, 1)
    return PackedWeight("fp8", w, _per_group(rows, n, dtype), None, k, n, k)
