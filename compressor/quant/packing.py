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
    start = torch.arange(cols, dtype=torch.int64) * bits
    word = start // 32
    offset = start % 32
    out = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    out.index_add_(1, word, u << offset)
    spill = offset + bits - 32
    over = spill > 0
    if over.any():
        out.index_add_(1, word[over] + 1, u[:, over] >> (bits - spill[over]))
    out = out[:, :n_words] & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 words [R, W] -> int8 codes [R, cols]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64)], dim=1)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word = start // 32
    offset = start % 32
    lo = p[:, word] >> offset
    hi = p[:, word + 1] << (32 - offset)
    u = (lo | torch.where(offset + bits > 32, hi, torch.zeros_like(hi))) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)
