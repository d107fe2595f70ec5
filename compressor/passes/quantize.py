"""The `quantize` pass: every linear of every block (and optionally lm_head / embeddings) into its planned format.

It walks the blocks and composes the technique handlers of `compressor.techniques`: per group of linears sharing
an input, activation-aware scaling (AWQ) if asked, then the solver (GPTQ, or data-free RTN / FP8), then the low-rank
correction a `lowrank` pass planned; each result is written back into the model (so later blocks calibrate on it)
and recorded in the plan."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import BlockSweep, GramStat, resolve_compute_dtype
from ..plan import LayerPlan, QuantizedWeight
from ..quant.formats import Fp8Format, IntFormat, resolve_format
from ..schema import QuantizePass, WeightScheme
from ..state import CompressionState
from ..techniques import (
    AwqConfig,
    GptqConfig,
    RtnConfig,
    fit_compensation,
    quantize_data_free,
    scale_inputs,
    solve_gptq,
    solve_gptq_diagnosed,
)
from ..techniques.awq import InputGroup
from .base import register

log = logging.getLogger(__name__)


@dataclass
class _Solved:
    """One solve unit's result: the quantized weights (in the unit's order), how they were made, diagnostics."""

    weights: list[QuantizedWeight]
    note: str | None
    method: str
    diagnostics: dict = field(default_factory=dict)


def _solve_cost(block: nn.Module, names: tuple[str, ...]) -> float:
    """A GPTQ solve's cost for balancing ranks, about rows x columns^2 (the column sweep) + columns^3."""
    numel = sum(block.get_submodule(n).weight.numel() for n in names)
    width = max(block.get_submodule(names[0]).weight.shape)  # (Conv1D stores its weight transposed)
    return float(numel * width + width**3)


def _run_all(ranks, jobs: list) -> list:
    """Equal-cost jobs (an AWQ grid's points) shared out among the run's workers; results in order on every one."""
    return ranks.run_assigned([(1.0, job) for job in jobs])


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
        self.rtn = RtnConfig.of(config)
        self.gptq = GptqConfig.of(config)
        self.awq = AwqConfig.of(config) if config.awq else None
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
        request = state.plan.lowrank
        rank = request.rank_for(name) if request is not None and h is not None and original is not None else 0
        if rank:
            dtype = request.config.storage_dtype(state.plan.dtype)
            comp = fit_compensation(original, deq, h, rank, request.config, dtype)
            layer.compensation_rank = comp.rank
            layer.compensation_bits = comp.rank * sum(qw.shape) * dtype.itemsize * 8
            removed = 1.0 - comp.error_after / comp.error_before if comp.error_before else 0.0
            state.report.setdefault("lowrank", []).append({"layer": name, "rank": comp.rank, "error_removed": removed})
        state.adapter.set_weight(module, deq if comp is None else deq + comp.delta())
        state.plan.record(layer, qw, comp)

    def quantize_data_free(self, w: torch.Tensor, fmt) -> QuantizedWeight:
        """w in `fmt` by RTN (or FP8 scaling) with this pass's scale settings."""
        return quantize_data_free(w, fmt, self.rtn)

    # ---- the pass ---------------------------------------------------------------------------------
    def run(self, state: CompressionState) -> None:
        model, adapter = state.model, state.adapter
        blocks = adapter.blocks(model)
        prefixes = adapter.block_prefixes(model)
        if self.cfg.method == "gptq" or self.cfg.awq or state.plan.lowrank is not None:
            self._run_calibrated(state, blocks, prefixes)
        else:
            self._run_data_free(state, blocks, prefixes)
        self._quantize_outer(state)

    def _run_data_free(self, state: CompressionState, blocks: nn.ModuleList, prefixes: list[str]) -> None:
        """RTN / FP8 block by block, without calibration data."""
        adapter = state.adapter
        for i, block in enumerate(tqdm(blocks, desc="quantize (rtn)", unit="block", disable=state.quiet)):
            state.load_block(prefixes[i])
            names = []
            for local in state.linear_names(i):
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
        cfg = self.cfg
        dtype = resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device)
        sweep = BlockSweep(
            state.model,
            blocks,
            state.ranks.shard(state.calibration_chunks()),
            dtype,
            token_clip=cfg.hessian_token_clip,
            track_abs=cfg.awq,
            keep_unclipped=cfg.diagnostics,
            reduce=state.ranks.reduce_gram,
        )
        state.evict_outside_blocks()  # embeddings / head are not used again until the sweep is done
        label = cfg.method + ("+awq" if cfg.awq else "")
        for i, block in tqdm(sweep, desc=f"quantize ({label})", unit="block", disable=state.quiet):
            state.load_block(prefixes[i])
            groups = [
                tuple(n for n in g if self.scheme_for(state, f"{prefixes[i]}.{n}") is not None)
                for g in state.linear_groups(i)
            ]
            groups = [g for g in groups if g]

            def solve(names: tuple[str, ...], stat: GramStat, block=block, prefix=prefixes[i]):
                divisor = self._activation_scale(state, block, prefix, names, stat) if self.awq else None
                # linears sharing an input share H; those with the same format are solved as one stacked matrix
                by_scheme: dict[str, list[str]] = {}
                for n in names:
                    by_scheme.setdefault(self.scheme_for(state, f"{prefix}.{n}").model_dump_json(), []).append(n)
                units = [tuple(members) for members in by_scheme.values()]
                solve_unit = partial(self._solve_unit, state, block, prefix)
                jobs = [(_solve_cost(block, u), partial(solve_unit, u, stat)) for u in units]
                for unit, solved in zip(units, state.ranks.run_assigned(jobs)):
                    self._commit_unit(state, block, prefix, unit, stat, solved)
                return divisor

            sweep.run(groups, solve)
            state.release_quantized([f"{prefixes[i]}.{n}" for g in groups for n in g])

    def _solve_unit(self, state, block: nn.Module, prefix: str, names: tuple[str, ...], stat: GramStat) -> _Solved:
        """The quantized weights of linears of one format sharing the input statistics `stat`: GPTQ (RTN method,
        fp8: data-free). Computes only (a distributed run gives each unit to one rank and broadcasts the result)."""
        scheme = self.scheme_for(state, f"{prefix}.{names[0]}")
        weights = [state.adapter.get_weight(block.get_submodule(n)) for n in names]
        fmt, note = self.layer_format(weights[0].shape[1], scheme)
        if isinstance(fmt, Fp8Format) or self.cfg.method == "rtn":
            return _Solved([self.quantize_data_free(w, fmt) for w in weights], note, "rtn")
        if self.cfg.diagnostics:  # report.json `gptq_diagnostics`, per layer
            solved, facts = solve_gptq_diagnosed(weights, stat.mean(), stat.mean_unclipped(), fmt, self.gptq)
            return _Solved(solved, note, "gptq", {f"{prefix}.{n}": f for n, f in zip(names, facts)})
        return _Solved(solve_gptq(weights, stat.mean(), fmt, self.gptq), note, "gptq")

    def _commit_unit(self, state, block: nn.Module, prefix: str, names: tuple[str, ...], stat, solved: _Solved):
        """Write a unit's solved weights into the model and the plan (every rank does, with the same result)."""
        h = stat.mean()
        if solved.diagnostics:
            state.report.setdefault("gptq_diagnostics", {}).update(solved.diagnostics)
        for n, qw in zip(names, solved.weights):
            module = block.get_submodule(n)
            original = state.adapter.get_weight(module)
            self._commit(state, f"{prefix}.{n}", module, qw, solved.note, solved.method, original=original, h=h)

    # ---- activation-aware scaling -----------------------------------------------------------------
    def _activation_scale(self, state, block: nn.Module, prefix: str, names: tuple[str, ...], stat: GramStat):
        """Search and fold an AWQ scale for the input shared by `names`; returns the input divisor or None."""
        adapter = state.adapter
        group = next(g for g in adapter.linear_groups if names[0] in g)  # every consumer, quantized or not

        def format_of(name: str, in_features: int):
            return self.layer_format(in_features, self.scheme_for(state, f"{prefix}.{name}"))[0]

        g = InputGroup(adapter, state.model.config, block, prefix, group, names)
        run_all = partial(_run_all, state.ranks)
        divisor, record = scale_inputs(g, format_of, stat, state.plan, self.rtn, self.awq, run_all)
        if record is not None:
            state.report.setdefault("awq", []).append(record)
        return divisor
