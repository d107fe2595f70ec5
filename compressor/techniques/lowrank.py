"""The low-rank correction of one layer's quantization error, fitted on its input Gram matrix."""

from __future__ import annotations

import torch

from ..quant.lowrank import LowRankFactors, whitened_lowrank
from ..schema import LowRankPass


def fit_compensation(
    original: torch.Tensor, dequantized: torch.Tensor, h: torch.Tensor, rank: int, cfg: LowRankPass, dtype
) -> LowRankFactors:
    """Rank-`rank` factors of (original - dequantized) under H, their values rounded to the storage `dtype`."""
    comp = whitened_lowrank(original.to(torch.float32) - dequantized, h, rank, cfg.damp)
    comp.round_to(dtype)
    return comp
