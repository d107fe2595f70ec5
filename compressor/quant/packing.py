"""Dense bit packing of signed integer codes into int32 words (the compressed-tensors `pack-quantized` layout).

Codes q in [-2^(b-1), 2^(b-1)-1] are offset to unsigned (q + 2^(b-1)); element i of a row occupies bits
[i*b, (i+1)*b) of the row's bit stream, little-endian within int32 words, words split across boundaries
for b = 3, 5, 6, 7. A row of K codes takes ceil(K*b/32) words.
"""

from __future__ import annotations

import math

import torch


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes [R, C] along the last dim into int32 words [R, ceil(C*bits/32)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, cols = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    n_words = math.ceil(cols * bits / 32)
    word, offset = _bit_positions(cols, bits)
    spill = offset + bits - 32
    over = (spill > 0).nonzero().squeeze(1)  # columns that spill into the next word (CPU: they depend on cols, bits)
    device = codes.device
    out = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=device)
    out.index_add_(1, word.to(device), u << offset.to(device))
    if len(over):
        out.index_add_(1, (word[over] + 1).to(device), u[:, over.to(device)] >> (bits - spill[over]).to(device))
    out = out[:, :n_words] & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 words [R, W] -> int8 codes [R, cols]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, p.new_zeros(p.shape[0], 1)], dim=1)
    word, offset = (t.to(packed.device) for t in _bit_positions(cols, bits))
    lo = p[:, word] >> offset
    hi = p[:, word + 1] << (32 - offset)
    u = (lo | torch.where(offset + bits > 32, hi, torch.zeros_like(hi))) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)


def _bit_positions(cols: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each of `cols` codes in a row's bit stream (int64, CPU)."""
    start = torch.arange(cols, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed zero points [N, G] packed along N, the compressed-tensors layout: int32 [ceil(N*bits/32), G]."""
    return pack_int32(zero.t().contiguous(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_zero_points: int8 zero points [rows, G] (a transposed view)."""
    return unpack_int32(packed.t().contiguous(), bits, rows).t()
