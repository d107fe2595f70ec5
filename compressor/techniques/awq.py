"""Activation-aware scaling as a handler: search a per-input-channel scale for linears that share an input
(`compressor.quant.awq`, on the input statistics), then fold it: the linears' columns are multiplied by it and the
module that produces their input divides its output by it (a norm, or a linear already quantized or not)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.engine import GramStat
from ..models.adapters import Adapter
from ..models.folding import can_fold_into, fold_divisor, scale_input_columns
from ..plan import AwqFold, Plan
from ..quant.awq import RunAll, awq_search
from ..quant.formats import Fp8Format, WeightFormatT, round_scale
from ..schema import QuantizePass
from .data_free import RtnConfig, quantize_data_free

FormatOf = Callable[[str, int], WeightFormatT]  # (linear's name in the block, in_features) -> its format


@dataclass(frozen=True)
class AwqConfig:
    grid: int = 20  # alpha values tried in [0, 1)

    @classmethod
    def of(cls, cfg: QuantizePass) -> AwqConfig:
        return cls(cfg.awq_grid)


@dataclass
class InputGroup:
    """Linears of one block reading the same input: `names` are the ones being quantized, `group` all of them."""

    adapter: Adapter
    config: object  # the model's config (some families fold only in some layouts: pre-LN OPT)
    block: nn.Module
    prefix: str
    group: tuple[str, ...]
    names: tuple[str, ...]


def scale_inputs(
    g: InputGroup,
    format_of: FormatOf,
    stat: GramStat,
    plan: Plan,
    rtn: RtnConfig,
    cfg: AwqConfig,
    run_all: RunAll | None = None,
) -> tuple[torch.Tensor | None, dict | None]:
    """Search and fold the scale of `g`'s input; returns (the input divisor or None, the search's record or None).

    `format_of(name, in_features)` gives each of `g.names` the format it will be quantized into; a scale source
    that cannot absorb the divisor (none, or an FP8 layer without per-channel scales) leaves the group unscaled.
    """
    source = _scale_source(g, plan)
    if source is None:
        return None, None
    src_name, src_module = source
    weights = [g.adapter.get_weight(g.block.get_submodule(n)) for n in g.names]
    formats = [format_of(n, w.shape[1]) for n, w in zip(g.names, weights)]
    quantizers = [lambda x, fmt=fmt: quantize_data_free(x, fmt, rtn).dequantize() for fmt in formats]
    found = awq_search(weights, quantizers, stat.mean(), stat.mean_abs(), cfg.grid, run_all)
    record = {
        "group": f"{g.prefix}.{g.group[0]}",
        "alpha": found.alpha,
        "output_error_ratio": found.error / found.error_unscaled if found.error_unscaled else 1.0,
    }
    if found.alpha == 0.0:
        return None, record
    plan.awq.append(AwqFold(record["group"], found.alpha, src_name))
    _fold(g.adapter, src_name, src_module, found.scale, plan)
    for n in g.group:
        scale_input_columns(g.block.get_submodule(n), found.scale)
    stat.rescale_inputs(found.scale)
    return found.scale, record


def _scale_source(g: InputGroup, plan: Plan) -> tuple[str, nn.Module] | None:
    """(full name, module) of what produces the group's input, if a per-channel divisor can be folded into it."""
    source = g.adapter.scale_source(g.block, g.group)
    if source is None or not g.adapter.folds_scales(g.config):
        return None
    src_path, src_module = source
    src_name = f"{g.prefix}.{src_path}"
    src_qw = plan.weights.get(src_name)
    per_tensor_fp8 = src_qw is not None and isinstance(src_qw.fmt, Fp8Format) and src_qw.fmt.strategy != "channel"
    if not can_fold_into(src_module) or per_tensor_fp8:
        return None
    return src_name, src_module


def _fold(adapter: Adapter, src_name: str, src_module: nn.Module, s: torch.Tensor, plan: Plan) -> None:
    """Divide the source's output by s: through its quantization scales (and correction) if it is already
    quantized (v_proj, up_proj), else in its float parameters."""
    src_qw = plan.weights.get(src_name)
    if src_qw is None:
        fold_divisor(src_module, s, adapter.norm_offset(src_module))
        return
    src_qw.scale = round_scale(src_qw.scale / s[:, None], src_qw.scale_dtype)
    if src_name in plan.compensations:  # its correction's output rows follow the same scaling
        plan.compensations[src_name].scale_rows(s)
    adapter.set_weight(src_module, plan.effective_weight(src_name))
    if getattr(src_module, "bias", None) is not None:
        src_module.bias.data /= s.to(src_module.bias.dtype)
