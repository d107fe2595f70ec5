"""`lowrank` with `mode: decompose`: the targeted block linears W become B A under a parameter budget.

Ranks first (`allocate.ranks`): uniform needs only the shapes; welore reads each weight's singular values (no data);
spectrum reads the method's own spectrum, for the calibrated methods on one sweep over the unchanged model; measured
predicts each truncation's KL from the `allocate_bits` sensitivity sweep (Fisher G and H per layer). Then the
factors, block by block: the calibrated methods (whitened, asvd) fit each block's layers on the input statistics
the already-decomposed blocks produce (`calibration.engine.BlockSweep`, as the quantize pass does), plain SVD needs
no data. While a block runs its weights are the dense products B A; once it has run its factored layers become
`runtime.factored.FactoredLinear` modules (`<layer>.lowrank_A` / `lowrank_B`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocate.check import Probe, pick_probes, probe_check
from ..allocate.heldout import HeldOutKL, held_out_rows
from ..allocate.ranks import DENSE, knapsack_ranks, share_lost, uniform_ranks
from ..calibration.engine import BlockSweep, GramStat, resolve_compute_dtype
from ..errors import RecipeError
from ..quant.lowrank import LowRankFactors, breakeven_rank, decompose, decomposition_spectrum, truncation_kl
from ..runtime.factored import CONFIG_KEY, FactoredLinear, set_submodule
from ..schema import LowRankPass
from ..schema.common import parse_size
from ..state import CompressionState

log = logging.getLogger(__name__)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a block linear without reading its values (a streamed block's weights may be on disk)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return int(module.weight.shape[1]), int(module.weight.shape[0])  # gpt2's Conv1D: [in, out]


class Decomposition:
    """Runs one `lowrank` pass in mode decompose on a CompressionState."""

    def __init__(self, cfg: LowRankPass):
        self.cfg = cfg

    def run(self, state: CompressionState) -> None:
        model, adapter, cfg = state.model, state.adapter, self.cfg
        prefixes = adapter.block_prefixes(model)
        targets = {
            f"{p}.{local}": (i, local)
            for i, p in enumerate(prefixes)
            for local in adapter.linear_names()
            if cfg.applies_to(f"{p}.{local}")
        }
        if not targets:
            raise RecipeError("no block linear matches the targets", where="lowrank.targets", fix="check the regexes")
        shapes = {n: linear_shape(model.get_submodule(n)) for n in targets}
        dense = sum(o * i for o, i in shapes.values())
        budget = self._budget(state, dense)
        ranks, spectra, predicted, check = self._ranks(state, targets, shapes, budget)
        factored = {n: r for n, r in ranks.items() if r != DENSE and r <= breakeven_rank(*shapes[n])}
        fits = factor_layers(state, factored, cfg.method, cfg.damp)
        state.plan.factored = dict(factored)
        record = decomposition_record(cfg.method, cfg.allocation, shapes, factored, fits, spectra, predicted)
        state.report["lowrank_decomposition"] = {**record, "budget_params": budget}
        if check is not None:
            state.report["lowrank_decomposition"]["check"] = check
        log.info(
            "lowrank decompose (%s, %s): %d of %d linears factored, %.1f%% of their parameters kept",
            cfg.method,
            cfg.allocation,
            len(factored),
            len(targets),
            100 * record["params_kept"],
        )

    def _ranks(self, state: CompressionState, targets, shapes, budget: int):
        """(ranks, spectra or None, predicted KL per rank or None, the probe check or None) by `allocation`."""
        cfg = self.cfg
        if cfg.allocation == "uniform":
            return uniform_ranks(shapes, budget), None, None, None
        if cfg.allocation == "measured":
            predicted, probes = self._predicted_kl(state, targets, shapes)
            ranks = knapsack_ranks(shapes, predicted, budget, cfg.rank_step)
            return ranks, None, predicted, self._check(state, probes) if probes else None
        method = "plain" if cfg.allocation == "welore" else cfg.method
        spectra = self._spectra(state, targets, shapes, method)
        losses = {n: share_lost(sp, breakeven_rank(*shapes[n])) for n, sp in spectra.items()}
        return knapsack_ranks(shapes, losses, budget, cfg.rank_step), spectra, None, None

    def _budget(self, state: CompressionState, dense: int) -> int:
        b = self.cfg.budget
        if b.params_kept is not None:
            return int(b.params_kept * dense)
        return int(parse_size(b.size) // state.plan.dtype.itemsize)

    # ---- measured allocation: the Fisher estimate of each truncation's KL ------------------------------------
    def _predicted_kl(self, state: CompressionState, targets, shapes) -> tuple[dict[str, np.ndarray], list[Probe]]:
        """Per target, the predicted KL of its rank-r truncation for every r (`quant.lowrank.truncation_kl`), from
        the `allocate_bits` sensitivity sweep (G, H) over the first `allocation_samples` windows; and the probes of
        the check (`check_probes` linears spread over kinds and depth, each truncated to half its break-even
        rank)."""
        from ..allocate.fisher import FisherSweep

        model, adapter, cfg = state.model, state.adapter, self.cfg
        if state.calibration_ids is None:
            raise RecipeError("allocation: measured needs calibration windows", where="lowrank.allocation")
        blocks = adapter.blocks(model)
        sweep = FisherSweep(
            model,
            blocks,
            adapter.block_prefixes(model),
            list(adapter.linear_groups),
            state.calibration_ids[: cfg.allocation_samples],
            seed=state.recipe.calibration.seed,
            quiet=state.quiet,
            compute_dtype=resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device),
            ranks=state.ranks,
            residency=state.residency(),
        )
        predicted: dict[str, np.ndarray] = {}
        names = list(targets)
        probed = {names[k] for k in pick_probes(names, cfg.check_probes)} if cfg.check_probes else set()
        probes: list[Probe] = []
        sweep.lim_scores()  # the forward (block boundaries stored)
        for fisher in sweep.blocks():  # each block resident while its statistics are read
            for name, (i, local) in targets.items():
                if i != fisher.index:
                    continue
                w = adapter.get_weight(blocks[i].get_submodule(local))
                h = fisher.input_gram(name)
                scale = h.diagonal().sqrt()  # (asvd: the inputs' RMS stands in for their mean magnitude)
                predicted[name] = truncation_kl(w, fisher.g[name], h, cfg.method, cfg.damp, scale).numpy()
                if name in probed:
                    r = max(1, breakeven_rank(*shapes[name]) // 2)
                    truncated = decompose(w, r, cfg.method, h, scale, cfg.damp).delta()
                    probes.append(Probe(name, f"rank {r}", float(predicted[name][r]), truncated))
        return predicted, sorted(probes, key=lambda p: names.index(p.name))

    def _check(self, state: CompressionState, probes: list[Probe]) -> dict:
        """The probes' predicted KL against the KL measured on held-out windows with only that linear truncated."""
        held = held_out_rows(state.calibration_ids, self.cfg.allocation_samples, self.cfg.check_samples)
        names = [p.name for p in probes]
        with HeldOutKL(state.model, state.adapter, names, held, state.residency(), state.ranks) as measure:
            check = probe_check(measure, probes)
        log.info(
            "lowrank decompose: predicted vs measured KL of %d probes, rank correlation %s",
            len(probes),
            check["rank_correlation"],
        )
        return check

    # ---- spectra -------------------------------------------------------------------------------------------
    def _spectra(self, state: CompressionState, targets, shapes, method: str) -> dict:
        """Each target's spectrum under `method` on the unchanged model (calibrated methods: one block sweep)."""
        spectra: dict = {}

        def measure(name: str, w: torch.Tensor, stat: GramStat | None) -> None:
            h, abs_mean = _statistics(stat, method)
            spectra[name] = decomposition_spectrum(w, method, breakeven_rank(*shapes[name]), h, abs_mean, self.cfg.damp)

        visit_linears(state, set(targets), method, measure, "lowrank (spectra)", change=False)
        return spectra


def decomposition_record(
    method: str,
    allocation: str,
    shapes: dict[str, tuple[int, int]],
    factored: dict[str, int],
    fits: dict[str, LowRankFactors],
    spectra: dict | None = None,
    predicted: dict[str, np.ndarray] | None = None,
) -> dict:
    """The report's `lowrank_decomposition` section: parameters before and after over the linears of `shapes`, and
    per linear its rank (None: kept dense), kept energy, predicted KL and relative output error."""
    dense = sum(o * i for o, i in shapes.values())
    kept = sum(r * sum(shapes[n]) for n, r in factored.items()) + sum(
        o * i for n, (o, i) in shapes.items() if n not in factored
    )
    return {
        "method": method,
        "allocation": allocation,
        "params_before": dense,
        "params_after": kept,
        "params_kept": kept / dense,
        "layers": {
            n: {
                "shape": list(shapes[n]),
                "rank": factored.get(n),
                "kept_energy": _kept_energy(spectra, n, factored.get(n)),
                "predicted_kl": None if predicted is None else float(predicted[n][factored.get(n) or -1]),
                "output_error": fits[n].error_after / fits[n].error_before if n in fits else 0.0,
            }
            for n in shapes
        },
        "config_key": CONFIG_KEY,
    }


def factor_layers(
    state: CompressionState, ranks: dict[str, int], method: str, damp: float, desc: str = "lowrank (decompose)"
) -> dict[str, LowRankFactors]:
    """Factor each linear of `ranks` (full name -> rank) into B A by `method`, block by block (the calibrated
    methods on the inputs the already-factored blocks produce); afterwards each is a `FactoredLinear` (spilled to
    disk for a streamed model). Returns the fits (their errors; the factors live in the modules)."""
    fits: dict[str, LowRankFactors] = {}

    def fit(name: str, w: torch.Tensor, stat: GramStat | None) -> torch.Tensor:
        h, abs_mean = _statistics(stat, method)
        fits[name] = decompose(w, ranks[name], method, h, abs_mean, damp)
        return fits[name].delta()

    visit_linears(state, set(ranks), method, fit, desc, change=True, fits=fits)
    return fits


def visit_linears(state: CompressionState, wanted: set[str], method: str, visit, desc: str, change: bool, fits=None):
    """Call `visit(name, W, stat)` for every wanted layer block by block (stat: its input statistics on the
    calibration windows, None for plain SVD); with `change`, the layer's weight becomes what `visit` returns
    while its block runs, and the factored module (from `fits`) afterwards."""
    model, adapter = state.model, state.adapter
    blocks, prefixes = adapter.blocks(model), adapter.block_prefixes(model)
    residency = state.residency()
    calibrated = method != "plain"
    sweep = None
    if calibrated:
        if state.calibration_ids is None:
            raise RecipeError(f"method {method} needs calibration windows", where="lowrank.method")
        dtype = resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device)
        chunks = state.ranks.shard(state.calibration_chunks())
        sweep = BlockSweep(model, blocks, chunks, dtype, track_abs=method == "asvd", reduce=state.ranks.reduce_gram)
    steps = sweep if sweep is not None else enumerate(blocks)
    for i, block in tqdm(steps, total=len(blocks), desc=desc, unit="block", disable=state.quiet):
        prefix = prefixes[i]
        mine = [local for local in adapter.linear_names() if f"{prefix}.{local}" in wanted]
        residency.load_block(i)

        def solve(names, stat, block=block, prefix=prefix):
            for local in names:
                module = block.get_submodule(local)
                new = visit(f"{prefix}.{local}", adapter.get_weight(module), stat)
                if change:
                    adapter.set_weight(module, new)

        if sweep is not None:
            groups = [tuple(n for n in g if n in mine) for g in adapter.linear_groups]
            sweep.run([g for g in groups if g], solve)
        elif mine:
            solve(tuple(mine), None)
        if change:
            for local in mine:
                name = f"{prefix}.{local}"
                old = block.get_submodule(local)
                bias = getattr(old, "bias", None)
                f = fits[name]
                set_submodule(block, local, FactoredLinear.of(f.down, f.up, None if bias is None else bias.float()))
                f.down, f.up = f.down[:0], f.up[:0]  # (the module holds them now; the fit keeps its errors)
            state.spill(
                [f"{prefix}.{local}.{p}" for local in mine for p, _ in block.get_submodule(local).named_parameters()]
            )
        residency.release_block(i)


def _kept_energy(spectra: dict | None, name: str, rank: int | None) -> float | None:
    """The share of the allocation spectrum's energy the rank keeps (None without a spectrum; 1 when dense)."""
    if spectra is None:
        return None
    if rank is None:
        return 1.0
    sp = spectra[name]
    return float(sp.energy[:rank].sum()) / sp.total if sp.total else 1.0


def _statistics(stat: GramStat | None, method: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(H, mean |x|) of a layer's inputs as the method reads them (None, None for plain SVD)."""
    if stat is None:
        return None, None
    return stat.mean(), stat.mean_abs() if method == "asvd" else None
