"""The `allocate_bits` pass: pick each linear's format under a size budget; the next `quantize` pass applies it."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..allocate import cache
from ..allocate.fisher import FisherStats, collect_fisher, predicted_kl
from ..allocate.solver import InfeasibleBudget, solve_exact, solve_greedy, solve_ordering, total
from ..calibration.engine import resolve_compute_dtype
from ..errors import RecipeError
from ..quant.formats import IntFormat, resolve_format
from ..schema import AllocateBitsPass, QuantizePass, WeightScheme
from ..schema.allocate import parse_candidate
from ..schema.common import parse_size
from ..state import CompressionState
from ..structure.metrics import zd_score
from ..techniques import GptqConfig, RtnConfig, gptq_candidates, quantize_data_free
from .base import following_quantize, register

log = logging.getLogger(__name__)


@dataclass
class Units:
    """The allocation problem: the linears, and per unit (linear or block) x candidate its cost and value."""

    names: list[str]  # every allocated linear
    unit_of: list[int]  # linear -> unit index
    unit_names: list[str]
    costs: np.ndarray  # [units, candidates] bits
    values: np.ndarray  # [units, candidates] predicted KL (or zeros for orderings)


@register(AllocateBitsPass)
class AllocateBitsRunner:
    def __init__(self, config: AllocateBitsPass) -> None:
        self.cfg = config
        self.schemes = config.schemes()

    def run(self, state: CompressionState) -> None:
        started = time.perf_counter()
        quant = self._following_quantize(state)
        names, modules, block_of = self._linears(state, quant)
        weights = {n: state.adapter.get_weight(m) for n, m in zip(names, modules)}
        linear_costs = np.array(
            [[self._cost(weights[n].shape, s, quant, state) for s in self.schemes] for n in names], dtype=np.int64
        )
        budget = self._budget_bits(weights, names, quant, state)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        lim: list[float] | None = None
        if self.cfg.method in ("measured", "search"):
            values, lim = self._sensitivities(state, quant, names, weights)
        elif self.cfg.method == "lim":
            values, lim = np.zeros(linear_costs.shape), self._lim_scores(state, quant)
        else:
            values = np.zeros(linear_costs.shape)
        timings["sensitivity"] = time.perf_counter() - t

        units = self._units(names, block_of, linear_costs, values)
        t = time.perf_counter()
        choice = self._solve(units, budget, lim, weights, state)
        timings["solve"] = time.perf_counter() - t
        if self.cfg.method == "search":
            from ..allocate.search import refine_by_kl

            t = time.perf_counter()
            choice = refine_by_kl(state, units, self.schemes, quant, choice, budget, self.cfg, weights)
            timings["search"] = time.perf_counter() - t

        for n, u in zip(names, units.unit_of):
            state.plan.schemes[n] = self.schemes[int(choice[u])]
        timings["total"] = time.perf_counter() - started
        n_weights = sum(weights[n].numel() for n in names)
        state.report["allocation"] = self._record(units, choice, lim, budget, n_weights, timings)
        counts: dict[str, int] = {}
        for n in names:
            label = self.cfg.candidates[self.schemes.index(state.plan.schemes[n])]
            counts[label] = counts.get(label, 0) + 1
        log.info(
            "allocate_bits: %.3f bits/weight of %.3f allowed; %s",
            state.report["allocation"]["used_bits_per_weight"],
            budget / n_weights,
            ", ".join(f"{c}: {k}" for c, k in counts.items()),
        )

    def _record(self, units: Units, choice, lim, budget: int, n_weights: int, timings: dict[str, float]) -> dict:
        """The report's record of the allocation: budget, spend, and each unit's choice and sensitivities."""
        spent, predicted = total(units.costs, units.values, choice)
        return {
            "method": self.cfg.method,
            "granularity": self.cfg.granularity,
            "target": self.cfg.runtime.name,
            "candidates": self.cfg.candidates,
            "budget_bits": int(budget),
            "budget_bits_per_weight": budget / n_weights,
            "used_bits": spent,
            "used_bits_per_weight": spent / n_weights,
            "predicted_kl": predicted if self.cfg.method in ("measured", "search") else None,
            "units": [
                {
                    "name": units.unit_names[u],
                    "format": self.cfg.candidates[int(choice[u])],
                    "sensitivity": {c: float(v) for c, v in zip(self.cfg.candidates, units.values[u])},
                    **({"lim": lim[u]} if lim is not None and self.cfg.granularity == "block" else {}),
                }
                for u in range(len(units.unit_names))
            ],
            "timings": {k: round(v, 2) for k, v in timings.items()},
        }

    # ---- the problem ------------------------------------------------------------------------------
    def _following_quantize(self, state: CompressionState) -> QuantizePass:
        return following_quantize(state, self.cfg, "allocate_bits", "chooses formats for")

    def _linears(self, state: CompressionState, quant: QuantizePass):
        model, adapter = state.full_model(), state.adapter
        ignore = [re.compile(p) for p in quant.ignore]
        names, modules, block_of = [], [], []
        for i, block in enumerate(adapter.blocks(model)):
            prefix = adapter.block_prefix(model, i)
            for local in adapter.linear_names():
                name = f"{prefix}.{local}"
                if any(p.search(name) for p in ignore):
                    continue
                names.append(name)
                modules.append(block.get_submodule(local))
                block_of.append(i)
        return names, modules, block_of

    def _cost(self, shape, scheme: WeightScheme | None, quant: QuantizePass, state: CompressionState) -> int:
        out_f, in_f = shape
        if scheme is None:
            return out_f * in_f * state.plan.dtype.itemsize * 8
        fmt, _ = resolve_format(scheme, in_f, quant.group_policy)
        return fmt.storage_bits(out_f, in_f, quant.scale_dtype)

    def _budget_bits(self, weights, names, quant, state) -> int:
        b = self.cfg.budget
        n_weights = sum(weights[n].numel() for n in names)
        if b.bits_per_weight is not None:
            return int(b.bits_per_weight * n_weights)
        if b.size is not None:
            try:
                return parse_size(b.size) * 8
            except ValueError as err:
                raise RecipeError(str(err), where="allocate_bits.budget.size", fix="e.g. size: 55MB") from None
        scheme = parse_candidate(b.uniform)
        return sum(self._cost(weights[n].shape, scheme, quant, state) for n in names)

    def _units(self, names, block_of, linear_costs, values) -> Units:
        if self.cfg.granularity == "linear":
            return Units(names, list(range(len(names))), list(names), linear_costs, values)
        blocks = sorted(set(block_of))
        index = {b: k for k, b in enumerate(blocks)}
        costs = np.zeros((len(blocks), linear_costs.shape[1]), dtype=np.int64)
        vals = np.zeros((len(blocks), linear_costs.shape[1]))
        for li, b in enumerate(block_of):
            costs[index[b]] += linear_costs[li]
            vals[index[b]] += values[li]
        unit_names = [names[block_of.index(b)].rsplit(".", 2)[0] for b in blocks]
        return Units(names, [index[b] for b in block_of], unit_names, costs, vals)

    def _solve(self, units: Units, budget: int, lim, weights, state) -> np.ndarray:
        try:
            if self.cfg.method in ("lim", "zd"):
                if self.cfg.method == "lim":
                    score = np.array(lim, dtype=np.float64)
                else:
                    pooled: list[list[torch.Tensor]] = [[] for _ in units.unit_names]
                    for n, u in zip(units.names, units.unit_of):
                        pooled[u].append(weights[n])
                    score = np.array([zd_score(ws) for ws in pooled])
                return solve_ordering(units.costs, np.argsort(-score, kind="stable"), budget)
            if self.cfg.solver == "greedy":
                return solve_greedy(units.costs, units.values, budget)
            return solve_exact(units.costs, units.values, budget)
        except InfeasibleBudget as err:
            n_weights = sum(weights[n].numel() for n in units.names)
            cheapest = units.costs.min(axis=1).sum() / n_weights
            raise RecipeError(
                f"the budget ({budget / n_weights:.3f} bits/weight) is below the cheapest candidate mix "
                f"({cheapest:.3f} bits/weight) [{err}]",
                where="allocate_bits.budget",
                fix="raise the budget or add a smaller candidate (e.g. 'int3 g64')",
            ) from None

    # ---- measurements -----------------------------------------------------------------------------
    def _sweep(self, state: CompressionState, quant: QuantizePass, backward: bool) -> FisherStats:
        model, adapter = state.full_model(), state.adapter
        blocks = adapter.blocks(model)
        prefixes = [adapter.block_prefix(model, i) for i in range(len(blocks))]
        ids = state.calibration_ids[: self.cfg.num_samples]
        return collect_fisher(
            model,
            blocks,
            prefixes,
            list(adapter.linear_groups),
            ids,
            state.recipe.calibration.seed,
            state.quiet,
            backward=backward,
            token_clip=quant.hessian_token_clip,
            compute_dtype=self._compute_dtype(state),
        )

    def _compute_dtype(self, state: CompressionState) -> torch.dtype:
        return resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device)

    def _lim_scores(self, state: CompressionState, quant: QuantizePass) -> list[float]:
        return self._sweep(state, quant, backward=False).lim

    def _cache_parts(self, state: CompressionState, quant: QuantizePass) -> dict:
        src = state.loaded.source
        return {
            "model": cache.model_fingerprint(src.location, src.gguf_file),
            "calibration": state.recipe.calibration.model_dump(mode="json"),
            "num_samples": self.cfg.num_samples,
            "candidates": self.cfg.candidates,
            "error_model": self._error_model(quant),
            "compute_dtype": str(self._compute_dtype(state)),
            "quantize": quant.model_dump(mode="json", exclude={"weights", "lm_head", "embeddings"}),
        }

    def _error_model(self, quant: QuantizePass) -> str:
        return quant.method if self.cfg.error_model == "auto" else self.cfg.error_model

    def _sensitivities(self, state, quant, names, weights) -> tuple[np.ndarray, list[float]]:
        folder = cache.cache_folder(self.cfg.cache_dir)
        key = cache.cache_key(self._cache_parts(state, quant)) if self.cfg.cache else None
        hit = cache.load_cached(folder, key) if key else None
        if hit and hit.get("names") == names:
            log.info("allocate_bits: sensitivities from cache %s", folder / f"{key}.json")
            return np.array(hit["values"]), hit["lim"]
        stats = self._sweep(state, quant, backward=True)
        method = self._error_model(quant)
        values = np.zeros((len(names), len(self.schemes)))
        by_input: dict[str, list[int]] = {}
        for li, name in enumerate(names):
            by_input.setdefault(stats.h_key[name], []).append(li)
        for input_key, members in tqdm(
            by_input.items(), desc="sensitivity (candidates)", unit="group", disable=state.quiet
        ):
            h = stats.h[input_key]
            stacked = torch.cat([weights[names[li]] for li in members])
            dequantized = self._candidates_dequantized(stacked, h, quant, method)
            row = 0
            for li in members:
                w = weights[names[li]]
                g = stats.g[names[li]].float()  # widened once for all candidates
                for ci, deq in dequantized.items():
                    values[li, ci] = predicted_kl(g, h, deq[row : row + w.shape[0]] - w)
                row += w.shape[0]
        if key:
            cache.store(folder, key, {"names": names, "values": values.tolist(), "lim": stats.lim})
        return values, stats.lim

    def _candidates_dequantized(self, w: torch.Tensor, h: torch.Tensor, quant: QuantizePass, method: str):
        """Candidate index -> the dequantized weight that candidate's quantizer makes of w (keep: skipped).

        GPTQ candidates are solved together in one stacked column sweep (static groups)."""
        out: dict[int, torch.Tensor] = {}
        gptq_jobs: list[tuple[int, IntFormat]] = []
        for ci, scheme in enumerate(self.schemes):
            if scheme is None:
                continue
            fmt, _ = resolve_format(scheme, w.shape[1], quant.group_policy)
            if method == "gptq" and isinstance(fmt, IntFormat):
                gptq_jobs.append((ci, fmt))
            else:
                out[ci] = quantize_data_free(w, fmt, RtnConfig.of(quant)).dequantize()
        if gptq_jobs:
            solved = gptq_candidates(w, h, [fmt for _, fmt in gptq_jobs], GptqConfig.of(quant))
            out.update({ci: deq for (ci, _), deq in zip(gptq_jobs, solved)})
        return out
