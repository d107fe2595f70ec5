"""The `allocate_bits` pass: pick each linear's format under a size budget; the next `quantize` pass applies it."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..allocate import cache
from ..allocate.check import Probe, compare_uniform, fitting_uniform, pick_probes, probe_check
from ..allocate.error_model import (
    candidate_rank,
    candidates_dequantized,
    factored_dequantized,
    swap_in_data_free,
    swap_in_sequential,
)
from ..allocate.fisher import FisherSweep, predicted_kl
from ..allocate.heldout import HeldOutKL, held_out_rows
from ..allocate.solver import InfeasibleBudget, solve_exact, solve_greedy, solve_ordering, total
from ..calibration.engine import resolve_compute_dtype
from ..errors import RecipeError
from ..quant.formats import resolve_format
from ..runtime.factored import A_NAME, B_NAME
from ..schema import AllocateBitsPass, LowRankPass, QuantizePass, WeightScheme
from ..schema.allocate import parse_candidate
from ..schema.common import parse_size
from ..state import CompressionState
from ..structure.metrics import zd_score
from .base import following_quantize, register
from .decompose import decomposition_record, factor_layers

log = logging.getLogger(__name__)
DECOMPOSE_DAMP = LowRankPass.model_fields["damp"].default  # rank candidates factor as lowrank decompose does


def _check_settings(cached: dict) -> dict | None:
    """The settings a cached entry's probe check was measured with (None when it has none)."""
    return (cached.get("check") or {}).get("settings")


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
        self.rank_choices = config.rank_choices()

    def run(self, state: CompressionState) -> None:
        started = time.perf_counter()
        quant = self._following_quantize(state)
        names, modules, block_of = self._linears(state, quant)
        # shapes only: a streamed model's blocks stay on disk (meta tensors) until the sweep brings each one in
        weights = {n: state.adapter.get_weight(m) for n, m in zip(names, modules)}
        linear_costs = self._linear_costs(names, weights, quant, state)
        budget = self._budget_bits(weights, names, quant, state)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        lim: list[float] | None = None
        check: dict | None = None
        if self.cfg.method in ("measured", "search"):
            values, lim, check = self._sensitivities(state, quant, names, weights, linear_costs)
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
            # a wall-time budget: a run of its own, not reproducible; in a distributed run one process searches and
            # its result goes to all (each searching alone would end at a different allocation)
            (choice,) = state.ranks.run_assigned(
                [(1.0, lambda: refine_by_kl(state, units, self.schemes, quant, choice, budget, self.cfg, weights))]
            )
            timings["search"] = time.perf_counter() - t
        fallback = None
        if self._checks_on:
            t = time.perf_counter()
            choice, fallback = self._safe_choice(state, quant, units, choice, budget, weights)
            timings["fallback"] = time.perf_counter() - t

        for n, u in zip(names, units.unit_of):
            state.plan.schemes[n] = self.schemes[int(choice[u])]
        if any(self.rank_choices):
            t = time.perf_counter()
            self._factor(state, names, weights, units, choice)
            timings["decompose"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        n_weights = sum(weights[n].numel() for n in names)
        record = self._record(units, choice, lim, budget, n_weights, timings)
        if self._checks_on:
            record.update(check=check, fallback=fallback)
        state.report["allocation"] = record
        self._log_summary(state, [self.cfg.candidates[int(choice[u])] for u in units.unit_of], budget / n_weights)

    @property
    def _checks_on(self) -> bool:
        """Whether `allocate_bits.check` applies: it is set and the method predicts sensitivities."""
        return self.cfg.check is not None and self.cfg.method in ("measured", "search")

    def _log_summary(self, state: CompressionState, chosen: list[str], allowed: float) -> None:
        """One info line: bits per weight used and allowed, and how many linears took each candidate (`chosen`: the
        candidate of every linear)."""
        counts: dict[str, int] = {}
        for label in chosen:
            counts[label] = counts.get(label, 0) + 1
        log.info(
            "allocate_bits: %.3f bits/weight of %.3f allowed; %s",
            state.report["allocation"]["used_bits_per_weight"],
            allowed,
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
                    "sensitivity": {
                        c: float(v) if np.isfinite(v) else None for c, v in zip(self.cfg.candidates, units.values[u])
                    },
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
        model, adapter = state.model, state.adapter
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

    def _linear_costs(self, names, weights, quant: QuantizePass, state: CompressionState) -> np.ndarray:
        """[linears, candidates] bits; also marks (`_unavailable`) the rank candidates a matrix cannot take (no
        rank below its break-even rank), whose values are made infinite."""
        shapes = [tuple(weights[n].shape) for n in names]
        candidates = range(len(self.schemes))
        self._unavailable = np.array(
            [[self.rank_choices[ci] is not None and self._rank(sh, ci) is None for ci in candidates] for sh in shapes],
            dtype=bool,
        ).reshape(len(names), len(self.schemes))
        return np.array([[self._cost(sh, ci, quant, state) for ci in candidates] for sh in shapes], dtype=np.int64)

    def _cost(self, shape, candidate: int, quant: QuantizePass, state: CompressionState) -> int:
        """Bits of one linear at a candidate: the weight, or for a rank candidate both factors (0 where the matrix
        cannot take it: its value is made infinite)."""
        scheme, rank = self.schemes[candidate], self._rank(shape, candidate)
        if self.rank_choices[candidate] is None:
            return self._dense_bits(shape, scheme, quant, state)
        if rank is None:
            return 0
        out_f, in_f = shape
        return self._dense_bits((rank, in_f), scheme, quant, state) + self._dense_bits(
            (out_f, rank), scheme, quant, state
        )

    def _rank(self, shape, candidate: int) -> int | None:
        """The rank candidate `candidate` gives a matrix of `shape` (None: a dense candidate, or none fits)."""
        return candidate_rank(self.rank_choices[candidate], self.schemes[candidate], tuple(shape))

    @staticmethod
    def _dense_bits(shape, scheme: WeightScheme | None, quant: QuantizePass, state: CompressionState) -> int:
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
        return sum(self._dense_bits(weights[n].shape, scheme, quant, state) for n in names)

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
                score = np.array(lim, dtype=np.float64) if self.cfg.method == "lim" else _zd_scores(units, state)
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
    def _sweep(self, state: CompressionState, quant: QuantizePass) -> FisherSweep:
        model, adapter = state.model, state.adapter
        blocks = adapter.blocks(model)
        return FisherSweep(
            model,
            blocks,
            [adapter.block_prefix(model, i) for i in range(len(blocks))],
            list(adapter.linear_groups),
            state.calibration_ids[: self.cfg.num_samples],
            seed=state.recipe.calibration.seed,
            quiet=state.quiet,
            token_clip=quant.hessian_token_clip,
            compute_dtype=self._compute_dtype(state),
            ranks=state.ranks,
            residency=state.residency(),
        )

    def _compute_dtype(self, state: CompressionState) -> torch.dtype:
        return resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device)

    def _lim_scores(self, state: CompressionState, quant: QuantizePass) -> list[float]:
        sweep = self._sweep(state, quant)
        try:
            return sweep.lim_scores()
        finally:
            sweep.close()

    def _cache_parts(self, state: CompressionState, quant: QuantizePass) -> dict:
        src = state.loaded.source
        return {
            "model": cache.model_fingerprint(src.location, src.gguf_file),
            "calibration": state.recipe.calibration.model_dump(mode="json"),
            "num_samples": self.cfg.num_samples,
            "candidates": self.cfg.candidates,
            "error_model": self._error_model(quant),
            "compute_dtype": str(self._compute_dtype(state)),
            # the sweep's definition: float64 G sums, tokens drawn per window index (older entries: bfloat16 G)
            "sweep": "block-by-block-2",
            "quantize": quant.model_dump(mode="json", exclude={"weights", "lm_head", "embeddings"}),
        }

    def _error_model(self, quant: QuantizePass) -> str:
        return quant.method if self.cfg.error_model == "auto" else self.cfg.error_model

    def _sensitivities(self, state, quant, names, weights, linear_costs) -> tuple[np.ndarray, list[float], dict | None]:
        """Predicted KL per (linear, candidate), block LIM scores, and the probe check (None when off), from the
        cache when it holds them (with a check of the same settings, if one is asked for), else measured."""
        folder = cache.cache_folder(self.cfg.cache_dir)
        key = cache.cache_key(self._cache_parts(state, quant)) if self.cfg.cache else None
        settings = self._probe_settings()
        hit = cache.load_cached(folder, key) if key else None
        if hit and hit.get("names") == names and (settings is None or _check_settings(hit) == settings):
            log.info("allocate_bits: sensitivities from cache %s", folder / f"{key}.json")
            check = {**hit["check"], "cached": True} if settings else None
            return np.array(hit["values"]), hit["lim"], self._warn_on_rank(check)
        probes = self._probe_candidates(names, linear_costs) if settings else {}
        values, lim, kept = self._measure_sensitivities(state, quant, names, weights, probes)
        check = self._probe_check(state, names, values, probes, kept) if settings else None
        if key:
            cache.store(folder, key, {"names": names, "values": values.tolist(), "lim": lim, "check": check})
        return values, lim, self._warn_on_rank({**check, "cached": False} if check else None)

    def _measure_sensitivities(self, state, quant, names, weights, probes: dict[int, int]):
        """The Fisher sweep's forward (LIM scores), then block by block from the last: each candidate's predicted
        KL per linear of the block, while the block is resident; also keeps the dequantized weight of each probe
        linear (index -> candidate in `probes`) at its probed candidate. A block's input groups are solved by the
        workers of a distributed run in turn (`Ranks.run_assigned`)."""
        sweep = self._sweep(state, quant)
        lim = sweep.lim_scores()
        method = self._error_model(quant)
        index = {name: li for li, name in enumerate(names)}
        values = np.zeros((len(names), len(self.schemes)))
        kept: dict[int, torch.Tensor] = {}
        for fisher in sweep.blocks():
            by_input: dict[str, list[int]] = {}
            for name, key in fisher.h_key.items():
                if name in index:
                    by_input.setdefault(key, []).append(index[name])
            groups = list(by_input.items())
            local = {li: state.adapter.get_weight(state.model.get_submodule(names[li])) for _, m in groups for li in m}
            measure = partial(self._group_sensitivities, fisher, names, local, quant, method, probes)
            cost = {k: sum(local[i].numel() for i in m) * local[m[0]].shape[1] for k, m in groups}
            jobs = [(cost[k], partial(measure, k, m)) for k, m in groups]
            for (_, members), (rows, kept_here) in zip(groups, state.ranks.run_assigned(jobs)):
                values[members] = rows
                kept.update(kept_here)
        return values, lim, kept

    def _group_sensitivities(self, fisher, names, local, quant, method, probes, input_key: str, members: list[int]):
        """Predicted KL of every candidate for the linears `members` sharing the input `input_key` (one stacked
        solve per candidate), and their probe candidates' dequantized weights. `local`: linear index -> weight."""
        h = fisher.h[input_key]
        stacked = torch.cat([local[li] for li in members])
        dense = {ci for ci, r in enumerate(self.rank_choices) if r is None}
        dequantized = candidates_dequantized(stacked, h, self.schemes, quant, method, dense)
        rows = np.zeros((len(members), len(self.schemes)))
        kept: dict[int, torch.Tensor] = {}
        row = 0
        for r, li in enumerate(members):
            w = local[li]
            g = fisher.g[names[li]]
            made = {ci: deq[row : row + w.shape[0]] for ci, deq in dequantized.items()}
            for ci in set(range(len(self.schemes))) - dense:  # rank candidates: one truncation per linear
                rank = self._rank(w.shape, ci)
                if rank is None:
                    rows[r, ci] = np.inf
                else:
                    made[ci] = factored_dequantized(w, h, rank, self.schemes[ci], quant, method, DECOMPOSE_DAMP)
            for ci, deq in made.items():
                rows[r, ci] = predicted_kl(g, h, deq - w)
                if probes.get(li) == ci:
                    kept[li] = deq.clone()
            row += w.shape[0]
        return rows, kept

    # ---- checks against measured KL ---------------------------------------------------------------
    def _probe_settings(self) -> dict | None:
        """What a cached probe check must have been measured with to serve this run (None: no probe check)."""
        if not self._checks_on or self.cfg.check.probes == 0:
            return None
        return {"probes": self.cfg.check.probes, "samples": self.cfg.check.samples}

    def _probe_candidates(self, names: list[str], linear_costs: np.ndarray) -> dict[int, int]:
        """Probe linear index -> its cheapest candidate that is not `keep` (chosen before any measurement)."""
        changed = [ci for ci, s in enumerate(self.schemes) if s is not None or self.rank_choices[ci] is not None]
        if not changed:
            return {}
        picks = pick_probes(names, self.cfg.check.probes)
        return {
            li: min((ci for ci in changed if not self._unavailable[li, ci]), key=lambda ci, li=li: linear_costs[li, ci])
            for li in picks
        }

    def _held_out(self, state: CompressionState, names: list[str]) -> HeldOutKL:
        held = held_out_rows(state.calibration_ids, self.cfg.num_samples, self.cfg.check.samples)
        return HeldOutKL(state.model, state.adapter, names, held, state.residency(), state.ranks)

    def _overlap(self, state: CompressionState) -> bool:
        """Whether the check's windows include some of the sensitivity sweep's (too few calibration rows)."""
        return state.calibration_ids.shape[0] < self.cfg.num_samples + self.cfg.check.samples

    def _probe_check(self, state, names, values, probes: dict[int, int], kept) -> dict:
        """Each probe's predicted KL against its measured end-to-end KL, and the settings it was measured with."""
        started, labels = time.perf_counter(), self.cfg.candidates
        chosen = [Probe(names[li], labels[ci], float(values[li, ci]), kept[li]) for li, ci in probes.items()]
        with self._held_out(state, [p.name for p in chosen]) as measure:
            result = probe_check(measure, chosen)
        return {
            **result,
            "overlaps_sensitivity_windows": self._overlap(state),
            "seconds": round(time.perf_counter() - started, 2),
            "settings": self._probe_settings(),
        }

    def _warn_on_rank(self, check: dict | None) -> dict | None:
        """The check with its verdict against `min_rank_correlation`; one warning line when it fails."""
        if check is None:
            return None
        rho, floor = check["rank_correlation"], self.cfg.check.min_rank_correlation
        passed = rho is not None and rho >= floor
        if not passed:
            shown = "undefined (constant KLs)" if rho is None else f"{rho:.2f}"
            log.warning(
                "allocate_bits: predicted sensitivities rank %d probe linears poorly against measured KL "
                "(Spearman %s < %.2f); the mix may lose to uniform: raise num_samples, use method: search, "
                "or a uniform recipe (e.g. w4-gptq)",
                len(check["probes"]),
                shown,
                floor,
            )
        return {**check, "min_rank_correlation": floor, "passed": passed}

    def _safe_choice(self, state, quant, units: Units, choice: np.ndarray, budget: int, weights):
        """The mix, or the best uniform allocation that fits the budget where it measures lower held-out KL (the
        weights of each as the error model makes them: for `gptq`, solved on the sweep's windows)."""
        labels, method = self.cfg.candidates, self._error_model(quant)
        uniform = {labels[c]: c for c in fitting_uniform(units.costs, units.values, labels, budget)}
        mix = {n: int(choice[u]) for n, u in zip(units.names, units.unit_of)}
        with self._held_out(state, units.names) as measure:
            swap_in = self._swap_in(state, quant, measure, method, {n: tuple(w.shape) for n, w in weights.items()})
            result = compare_uniform(measure, swap_in, mix, uniform, method, quiet=state.quiet)
        if result["used"] and not self.cfg.check.fallback:
            log.warning("allocate_bits: %s; keeping the mix (check.fallback: false)", result["reason"])
            result.update(used=False, reason=result["reason"] + "; kept the mix: check.fallback is false")
        elif result["used"]:
            log.warning("allocate_bits: %s; using it instead of the mix", result["reason"])
            choice = np.full(len(units.unit_names), labels.index(result["candidate"]), dtype=np.int64)
        return choice, {**result, "overlaps_sensitivity_windows": self._overlap(state)}

    def _swap_in(self, state, quant, measure: HeldOutKL, method: str, shapes: dict[str, tuple[int, int]]):
        """`swap_in(candidate_of)`: the block step that makes an allocation's weights as error model `method` does
        and swaps them into `measure`; `gptq`, and any allocation with rank candidates (a truncation needs its
        input statistics), runs true-sequentially on the sensitivity sweep's windows, as the passes would."""
        if method != "gptq" and not any(self.rank_choices):
            return lambda candidate_of: swap_in_data_free(measure, candidate_of, self.schemes, quant)
        ids, batch = state.calibration_ids[: self.cfg.num_samples], state.recipe.calibration.batch_size
        chunks = [ids[i : i + batch] for i in range(0, ids.shape[0], batch)]
        dtype = self._compute_dtype(state)

        def rank_of(name: str, candidate: int) -> int | None:
            return self._rank(shapes[name], candidate)

        return lambda candidate_of: swap_in_sequential(
            measure, chunks, candidate_of, self.schemes, quant, dtype, method, rank_of, DECOMPOSE_DAMP
        )

    # ---- carrying out rank choices ----------------------------------------------------------------
    def _factor(self, state: CompressionState, names: list[str], weights, units: Units, choice: np.ndarray) -> None:
        """Factor every linear whose choice is a rank candidate (whitened truncation, block by block as `lowrank`
        decompose does) and hand both factors that candidate's format for the quantize pass."""
        shapes = {n: tuple(weights[n].shape) for n in names}
        ranks = {}
        for n, u in zip(names, units.unit_of):
            rank = self._rank(shapes[n], int(choice[u]))
            if rank is not None:
                ranks[n] = rank
        fits = factor_layers(state, ranks, "whitened", DECOMPOSE_DAMP, "allocate_bits (decompose)") if ranks else {}
        state.plan.factored.update(ranks)
        for n in ranks:
            scheme = state.plan.schemes.pop(n)
            state.plan.schemes[f"{n}.{A_NAME}"] = state.plan.schemes[f"{n}.{B_NAME}"] = scheme
        state.report["lowrank_decomposition"] = decomposition_record("whitened", "allocate_bits", shapes, ranks, fits)


def _zd_scores(units: Units, state: CompressionState) -> np.ndarray:
    """ZD score of every unit over its real weights, a block at a time (a unit lies within one block; a streamed
    model's block is brought in for it and let go)."""
    model, adapter, residency = state.model, state.adapter, state.residency()
    score = np.zeros(len(units.unit_names))
    prefixes = [p + "." for p in adapter.block_prefixes(model)]
    by_block = [[(n, u) for n, u in zip(units.names, units.unit_of) if n.startswith(p)] for p in prefixes]
    outside = [(n, u) for n, u in zip(units.names, units.unit_of) if not n.startswith(tuple(prefixes))]
    for i, members in [*enumerate(by_block), (None, outside)]:
        if not members:
            continue
        if i is not None:
            residency.load_block(i)
        pooled: dict[int, list[torch.Tensor]] = {}
        for n, u in members:
            pooled.setdefault(u, []).append(adapter.get_weight(model.get_submodule(n)))
        for u, ws in pooled.items():
            score[u] = zd_score(ws)
        if i is not None:
            residency.release_block(i)
    return score
