"""GPTQ as a handler: linears that share an input share its Gram matrix H and are solved as one stacked matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import QuantizedWeight
from ..quant.formats import IntFormat
from ..quant.gptq import SweepStats, gptq_dequantized_many, gptq_quantize, rtn_clamped
from ..quant.linalg import output_error
from ..schema import QuantizePass
from .data_free import RtnConfig, rtn_weight


@dataclass(frozen=True)
class GptqConfig:
    """The solver's settings (the statistics' token clip belongs to their gathering, not here)."""

    rtn: RtnConfig
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False

    @classmethod
    def of(cls, cfg: QuantizePass) -> GptqConfig:
        rtn = RtnConfig(cfg.scale_dtype, cfg.clip_search is not False)  # null: on for GPTQ (weighted by diag H)
        return cls(rtn, cfg.gptq_block_size, cfg.damp, cfg.act_order, cfg.static_groups)


def solve_gptq(
    weights: list[torch.Tensor], h: torch.Tensor, fmt: IntFormat, cfg: GptqConfig, stats: SweepStats | None = None
) -> list[QuantizedWeight]:
    """Each weight [out_i, in] quantized into `fmt` by one GPTQ sweep over their stacked rows (`stats`, if given,
    is filled in for the stacked rows)."""
    scale_dtype = cfg.rtn.scale_dtype
    codes, scale, zero = gptq_quantize(
        torch.cat(weights, dim=0),
        h,
        fmt,
        scale_dtype=scale_dtype,
        block_size=cfg.block_size,
        damp=cfg.damp,
        act_order=cfg.act_order,
        static_groups=cfg.static_groups,
        clip_search=cfg.rtn.clip_search,
        stats=stats,
    )
    out, row = [], 0
    for w in weights:
        rows = slice(row, row + w.shape[0])
        row += w.shape[0]
        part_zero = None if zero is None else zero[rows].clone()
        out.append(QuantizedWeight(fmt, codes[rows].clone(), scale[rows].clone(), part_zero, scale_dtype))
    return out


def solve_gptq_diagnosed(
    weights: list[torch.Tensor], h: torch.Tensor, h_unclipped: torch.Tensor, fmt: IntFormat, cfg: GptqConfig
) -> tuple[list[QuantizedWeight], list[dict]]:
    """`solve_gptq`, and for each weight its diagnostics: the output error tr(dW H dW^T) of the GPTQ result and of
    round-to-nearest onto the same grid rule, under `h_unclipped` (H before the token clip) and under `h` (the H
    the solver used); the weights each clamped at the grid's ends; the damping over median(diag h)."""
    stats = SweepStats()
    solved = solve_gptq(weights, h, fmt, cfg, stats)
    damping = stats.damping / max(torch.diag(h).median().item(), 1e-30)
    out, row = [], 0
    for w, qw in zip(weights, solved):
        w = w.to(torch.float32)
        gptq_error, rtn_error = qw.dequantize() - w, rtn_weight(w, fmt, cfg.rtn).dequantize() - w
        out.append(
            {
                "output_error_gptq": output_error(gptq_error, h_unclipped),
                "output_error_rtn": output_error(rtn_error, h_unclipped),
                "clipped_h_error_gptq": output_error(gptq_error, h),
                "clipped_h_error_rtn": output_error(rtn_error, h),
                "clamped_gptq": int(stats.clamped[row : row + w.shape[0]].sum()),
                "clamped_rtn": int(rtn_clamped(w, fmt, cfg.rtn.scale_dtype, cfg.rtn.clip_search).sum()),
                "damping_to_median_diag": damping,
            }
        )
        row += w.shape[0]
    return solved, out


def gptq_candidates(w: torch.Tensor, h: torch.Tensor, fmts: list[IntFormat], cfg: GptqConfig) -> list[torch.Tensor]:
    """What GPTQ (static groups) makes of w in each of `fmts`, dequantized: one sweep serves every candidate."""
    return gptq_dequantized_many(
        w,
        h,
        fmts,
        scale_dtype=cfg.rtn.scale_dtype,
        block_size=cfg.block_size,
        damp=cfg.damp,
        act_order=cfg.act_order,
        clip_search=cfg.rtn.clip_search,
    )
