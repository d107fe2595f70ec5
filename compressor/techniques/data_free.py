"""The data-free handlers: round-to-nearest for INT formats, scaling into E4M3 for FP8."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import QuantizedWeight
from ..quant.formats import Fp8Format, IntFormat, WeightFormatT
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
        return cls(cfg.scale_dtype, bool(cfg.clip_search))  # null: off for data-free RTN


def rtn_weight(w: torch.Tensor, fmt: IntFormat, cfg: RtnConfig) -> QuantizedWeight:
    """w [out, in] rounded to the nearest point of the INT grid `fmt`."""
    codes, scale, zero = rtn_quantize(w, fmt, cfg.scale_dtype, cfg.clip_search)
    return QuantizedWeight(fmt, codes, scale, zero, cfg.scale_dtype)


def fp8_weight(w: torch.Tensor, fmt: Fp8Format) -> QuantizedWeight:
    """w [out, in] scaled into E4M3 (scales are always float32)."""
    codes, scale = fp8_quantize(w, fmt)
    return QuantizedWeight(fmt, codes, scale, None, "float32")


def quantize_data_free(w: torch.Tensor, fmt: WeightFormatT, cfg: RtnConfig) -> QuantizedWeight:
    """w [out, in] quantized into `fmt` without calibration data: FP8 scaling or INT round-to-nearest."""
    return fp8_weight(w, fmt) if isinstance(fmt, Fp8Format) else rtn_weight(w, fmt, cfg)
