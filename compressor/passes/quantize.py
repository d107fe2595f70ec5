"""The `quantize` pass: RTN, GPTQ or FP8 for every linear of every block (and optionally lm_head)."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import (
    GramStat,
    capture_block_inputs,
    resolve_compute_dtype,
    return_free_memory,
    run_block_lockstep,
)
from ..models.folding import can_fold_into, fold_divisor, scale_input_columns
from ..plan import LayerPlan, QuantizedWeight
from ..quant.awq import awq_search
from ..quant.formats import Fp8Format, IntFormat, resolve_format
from ..quant.fp8 import fp8_quantize
from ..quant.gptq import gptq_quantize
from ..quant.lowrank import whitened_lowrank
from ..quant.rtn import rtn_quantize
from ..schema import QuantizePass, WeightScheme
from ..state import CompressionState
from .base import register

log = logging.getLogger(__name__)


def untie_embeddings(model: nn.Module) -> None:
    """Give the output embeddings their own copy of a weight shared with the input embeddings."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.data.clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


@register(QuantizePass)
class QuantizeRunner:
    def __init__(self, config: QuantizePass):
        self.cfg = config
        self._ignore = [re.compile(p) for p in config.ignore]

    # ---- format per layer -------------------------------------------------------------------------
    def scheme_for(self, state: CompressionState, name: str) -> WeightScheme | None:
        """The layer's weight scheme: an `allocate_bits` decision if there is one, else the pass's; None = keep."""
        if name in state.plan.schemes:
            return state.plan.schemes[name]
        return None if self._ignored(name) else self.cfg.weights

    def layer_format(
        self, in_features: int, scheme: WeightScheme | None = None
    ) -> tuple[IntFormat | Fp8Format, str | None]:
        """The format for a layer of this input width, applying the group-size policy."""
        return resolve_format(scheme or self.cfg.weights, in_features, self.cfg.group_policy)

    def _ignored(self, name: str) -> bool:
        return any(p.search(name) for p in self._ignore)

    # ---- committing a result ----------------------------------------------------------------------
    def _commit(
        self,
        state: CompressionState,
        name: str,
        module: nn.Module,
        qw: QuantizedWeight,
        note,
        method,
        original: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
    ):
        """Write the quantized weight back into the model (so later blocks see it) and record it in the plan.

        With a `lowrank` compensation request, `original` and the input Gram matrix `h` give the layer's
        correction: fitted here, rounded to the artifact's float dtype, and included in the weight written back.
        """
        scheme = self.scheme_for(state, name) or self.cfg.weights
        requested = scheme.group_size if scheme.strategy == "group" else None
        layer = LayerPlan.describe(name, qw, method, requested, note)
        deq = qw.dequantize()
        comp = None
        request = state.plan.compensation
        rank = request.rank_for(name) if request is not None and h is not None and original is not None else 0
        if rank:
            comp = whitened_lowrank(original.to(torch.float32) - deq, h, rank, request.config.damp)
            dtype = request.config.storage_dtype(state.plan.dtype)
            comp.round_to(dtype)
            layer.compensation_rank = comp.rank
            layer.compensation_bits = comp.rank * sum(qw.shape) * dtype.itemsize * 8
            state.report.setdefault("lowrank", []).append(
                {
                    "layer": name,
                    "rank": comp.rank,
                    "error_removed": 1.0 - comp.error_after / comp.error_before if comp.error_before else 0.0,
                }
            )
        state.adapter.set_weight(module, deq if comp is None else deq + comp.delta())
        state.plan.record(layer, qw, comp)

    def quantize_data_free(self, w: torch.Tensor, fmt) -> QuantizedWeight:
        if isinstance(fmt, Fp8Format):
            codes, scale = fp8_quantize(w, fmt)
            return QuantizedWeight(fmt, codes, scale, None, "float32")
        codes, scale, zero = rtn_quantize(w, fmt, self.cfg.scale_dtype, self.cfg.clip_search)
        return QuantizedWeight(fmt, codes, scale, zero, self.cfg.scale_dtype)

    # ---- the pass ---------------------------------------------------------------------------------
    def run(self, state: CompressionState) -> None:
        model, adapter = state.model, state.adapter
        blocks = adapter.blocks(model)
        prefixes = adapter.block_prefixes(model)
        if self.cfg.method == "gptq" or self.cfg.awq or state.plan.compensation is not None:
            self._run_calibrated(state, blocks, prefixes)
        else:
            for i, block in enumerate(tqdm(blocks, desc="quantize (rtn)", unit="block", disable=state.quiet)):
                state.load_block(prefixes[i])
                names = []
                for local in adapter.linear_names():
                    name = f"{prefixes[i]}.{local}"
                    scheme = self.scheme_for(state, name)
                    if scheme is None:
                        continue
                    module = block.get_submodule(local)
                    w = adapter.get_weight(module)
                    fmt, note = self.layer_format(w.shape[1], scheme)
                    self._commit(state, name, module, self.quantize_data_free(w, fmt), note, "rtn")
                    names.append(name)
                state.release_quantized(names)
        self._quantize_outer(state)

    def _quantize_outer(self, state: CompressionState) -> None:
        """RTN for the input embeddings / lm_head when the recipe asks (they sit outside the blocks)."""
        model = state.model
        wanted = []
        if self.cfg.embeddings:
            wanted.append(model.get_input_embeddings())
        if self.cfg.lm_head:
            head = model.get_output_embeddings()
            if head is None:
                log.warning("quantize.lm_head is set but the model has no output embeddings; skipped")
            else:
                wanted.append(head)
        if not wanted:
            return
        names = {id(m): n for n, m in model.named_modules()}
        for module in wanted:
            state.load_block(names[id(module)])
        untie_embeddings(model)  # tied weights would otherwise change together
        for module in wanted:
            w = module.weight.data.to(torch.float32)
            fmt, note = self.layer_format(w.shape[1])
            self._commit(state, names[id(module)], module, self.quantize_data_free(w, fmt), note, "rtn")
        state.release_quantized([names[id(m)] for m in wanted])

    def _run_calibrated(self, state: CompressionState, blocks: nn.ModuleList, prefixes: list[str]) -> None:
        """Block by block on calibration activations: optional activation-aware scaling, then GPTQ (or RTN)."""
        adapter, cfg = state.adapter, self.cfg
        dtype = resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device)
        calls = capture_block_inputs(state.model, blocks, state.calibration_chunks())
        calls.cast_floats(dtype)
        hidden, calls.hidden = calls.hidden, []
        state.evict_outside_blocks()  # embeddings / head are not used again until the sweep is done
        label = cfg.method + ("+awq" if cfg.awq else "")
        progress = tqdm(total=len(blocks), desc=f"quantize ({label})", unit="block", disable=state.quiet)
        for i, block in enumerate(blocks):
            return_free_memory()
            state.load_block(prefixes[i])
            groups = [
                tuple(n for n in g if self.scheme_for(state, f"{prefixes[i]}.{n}") is not None)
                for g in adapter.linear_groups
            ]
            groups = [g for g in groups if g]

            def solve(names: tuple[str, ...], stat: GramStat, block=block, prefix=prefixes[i]):
                divisor = self._activation_scale(state, block, prefix, names, stat) if cfg.awq else None
                # linears sharing an input share H; those with the same format are solved as one stacked matrix
                by_scheme: dict[str, list[str]] = {}
                for n in names:
                    by_scheme.setdefault(self.scheme_for(state, f"{prefix}.{n}").model_dump_json(), []).append(n)
                for members in by_scheme.values():
                    self._solve_group(state, block, prefix, tuple(members), stat)
                return divisor

            hidden = run_block_lockstep(
                block,
                hidden,
                calls.args[i],
                calls.kwargs[i],
                groups,
                solve,
                cfg.hessian_token_clip,
                dtype,
                consume_inputs=True,
                track_abs=cfg.awq,
            )
            state.release_quantized([f"{prefixes[i]}.{n}" for g in groups for n in g])
            progress.update(1)
        progress.close()

    def _solve_group(self, state, block: nn.Module, prefix: str, names: tuple[str, ...], stat: GramStat) -> None:
        """GPTQ for linears of one format sharing the input statistics `stat` (RTN method, fp8: data-free)."""
        adapter, cfg = state.adapter, self.cfg
        scheme = self.scheme_for(state, f"{prefix}.{names[0]}")
        modules = [block.get_submodule(n) for n in names]
        weights = [adapter.get_weight(m) for m in modules]
        fmt, note = self.layer_format(weights[0].shape[1], scheme)
        if isinstance(fmt, Fp8Format) or cfg.method == "rtn":
            for n, m, w in zip(names, modules, weights):
                qw = self.quantize_data_free(w, fmt)
                self._commit(state, f"{prefix}.{n}", m, qw, note, "rtn", original=w, h=stat.mean())
            return
        stacked = torch.cat(weights, dim=0)
        h = stat.mean()
        codes, scale, zero = gptq_quantize(
            stacked,
            h,
            fmt,
            scale_dtype=cfg.scale_dtype,
            block_size=cfg.gptq_block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            static_groups=cfg.static_groups,
            clip_search=cfg.clip_search,
        )
        row = 0
        for n, m, w in zip(names, modules, weights):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            qw = QuantizedWeight(
                fmt,
                codes[rows].clone(),
                scale[rows].clone(),
                None if zero is None else zero[rows].clone(),
                cfg.scale_dtype,
            )
            self._commit(state, f"{prefix}.{n}", m, qw, note, "gptq", original=w, h=h)

    # ---- activation-aware scaling -----------------------------------------------------------------
    def _activation_scale(self, state, block: nn.Module, prefix: str, names: tuple[str, ...], stat: GramStat):
        """Search and apply an AWQ scale for the input shared by `names`; returns the input divisor or None."""
        adapter = state.adapter
        group = next(g for g in adapter.linear_groups if names[0] in g)  # every consumer, quantized or not
        source = adapter.scale_source(block, group)
        if source is None or not getattr(state.model.config, "do_layer_norm_before", True):
            return None
        src_path, src_module = source
        src_name = f"{prefix}.{src_path}"
        src_qw = state.plan.weights.get(src_name)
        if not can_fold_into(src_module) or (
            isinstance(src_qw, QuantizedWeight)
            and isinstance(src_qw.fmt, Fp8Format)
            and src_qw.fmt.strategy != "channel"
        ):
            return None
        modules = {n: block.get_submodule(n) for n in group}
        weights, quantizers = [], []
        for n in names:
            scheme = self.scheme_for(state, f"{prefix}.{n}")
            w = adapter.get_weight(modules[n])
            fmt, _ = self.layer_format(w.shape[1], scheme)
            weights.append(w)
            quantizers.append(lambda x, fmt=fmt: self.quantize_data_free(x, fmt).dequantize())
        found = awq_search(weights, quantizers, stat.mean(), stat.mean_abs(), self.cfg.awq_grid)
        state.report.setdefault("awq", []).append(
            {
                "group": f"{prefix}.{group[0]}",
                "alpha": found.alpha,
                "output_error_ratio": found.error / found.error_unscaled if found.error_unscaled else 1.0,
            }
        )
        if found.alpha == 0.0:
            return None
        state.plan.awq.append({"group": f"{prefix}.{group[0]}", "alpha": found.alpha, "folded_into": src_name})
        s = found.scale
        if src_qw is not None:  # already quantized (v_proj, up_proj): rescale its rows through its scales
            src_qw.scale = _round_scale_rows(src_qw.scale / s[:, None], src_qw.scale_dtype)
            if src_name in state.plan.compensations:  # its correction's output rows follow the same scaling
                state.plan.compensations[src_name].scale_rows(s)
            adapter.set_weight(src_module, state.plan.effective_weight(src_name))
            if getattr(src_module, "bias", None) is not None:
                src_module.bias.data /= s.to(src_module.bias.dtype)
        else:
            fold_divisor(src_module, s)
        for m in modules.values():
            scale_input_columns(m, s)
        stat.rescale_inputs(s)
        return s


def _round_scale_rows(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    return scale.to(dtypes.get(scale_dtype, torch.float32)).to(torch.float32)
