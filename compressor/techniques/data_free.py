"""Data-free quantization: round-to-nearest for INT formats, scaling into E4M3 for FP8."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import QuantizedWeight
from ..quant.formats import Fp8Format, WeightFormatT
from ..quant.fp8 import fp8_quantize
from ..quant.rtn import rtn_quantize
from ..schema import QuantizePass


@dataclass(frozen=True)
class RtnConfig:
    """How INT scales are found and stored (also the grid that GPTQ and AWQ quantize onto)."""

    scale_dtype: str = "float16"
    clip_search: bool = False

    @classmethod
    def of(cls, cfg: QuantizePass) -> RtnConfig:
        return cls(cfg.scale_dtype, cfg.clip_search)


def quantize_data_free(w: torch.Tensor, fmt: WeightFormatT, cfg: RtnConfig) -> QuantizedWeight:
    """w [out, in] quantized into `fmt` without calibration data (FP8 scales are always float32)."""
    if isinstance(fmt, Fp8Format):
        codes, scale = fp8_quantize(w, fmt)
        return QuantizedWeight(fmt, codes, scale, None, "float32")
    codes, scale, zero = rtn_quantize(w, fmt, cfg.scale_dtype, cfg.clip_search)
    return QuantizedWeight(fmt, codes, scale, zero, cfg.scale_dtype)
