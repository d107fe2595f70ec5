"""FP8 E4M3 weight quantization per tensor, per output channel, or per 2-D block."""

from __future__ import annotations

import math

import torch

from .formats import Fp8Format

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_quantize(w: torch.Tensor, fmt: Fp8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (float8_e4m3fn weights [N, K], float32 scale) with w ~= fp8 * scale.

    Scale shapes: tensor -> [1], channel -> [N, 1], block -> [ceil(N/bn), ceil(K/bk)].
    """
    w = w.to(torch.float32)
    if fmt.strategy == "tensor":
        scale = _safe(w.abs().amax().reshape(1) / FP8_MAX)
        full = scale
    elif fmt.strategy == "channel":
        scale = _safe(w.abs().amax(dim=1, keepdim=True) / FP8_MAX)
        full = scale
    else:
        scale = _safe(block_amax(w, fmt.block) / FP8_MAX)
        full = expand_blocks(scale, w.shape, fmt.block)
    q = torch.clamp(w / full, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    n, k = w.shape
    bn, bk = block
    padded = torch.nn.functional.pad(w.abs(), (0, (-k) % bk, 0, (-n) % bn))
    return padded.reshape(math.ceil(n / bn), bn, math.ceil(k / bk), bk).amax(dim=(1, 3))


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int] | torch.Size, block: tuple[int, int]) -> torch.Tensor:
    n, k = shape
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Float32 weights from FP8 codes and scales."""
    qf = q.to(torch.float32)
    if fmt.strategy == "block":
        return qf * expand_blocks(scale.to(torch.float32), qf.shape, fmt.block)
    return qf * scale.to(torch.float32)
