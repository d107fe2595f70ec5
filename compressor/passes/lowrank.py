"""The `lowrank` pass: hand a low-rank compensation request to the `quantize` pass that follows.

The factors are fitted inside the quantize pass (`compressor.quant.lowrank`), layer by layer with the input
statistics GPTQ solves with, so that blocks downstream are calibrated on the corrected outputs. This pass checks
the recipe, records the request (the way `allocate_bits` records formats) and, with a budget, allocates the ranks:
one sweep over the unchanged model measures each layer's whitened error spectrum under round-to-nearest in the
format the quantize pass will use, and the ranks go where they remove the largest share of a layer's error per
stored number.
"""

from __future__ import annotations

import logging
import math

from tqdm.auto import tqdm

from ..calibration.engine import BlockSweep, resolve_compute_dtype
from ..plan import CompensationRequest
from ..quant.lowrank import ErrorSpectrum, allocate_ranks, error_spectrum
from ..schema import LowRankPass, QuantizePass
from ..state import CompressionState
from .base import following_quantize, register
from .quantize import QuantizeRunner

log = logging.getLogger(__name__)


@register(LowRankPass)
class LowRankRunner:
    def __init__(self, config: LowRankPass):
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        if self.cfg.mode == "decompose":
            from .decompose import Decomposition

            Decomposition(self.cfg).run(state)
            return
        quant = following_quantize(state, self.cfg, "lowrank", "corrects the quantization error of")
        state.plan.lowrank = CompensationRequest(self.cfg)
        if self.cfg.budget_bits_per_weight is None:
            log.info(
                "lowrank: the quantize pass (%s) fits rank-%d corrections of its error", quant.method, self.cfg.rank
            )
            return
        spectra = self._spectra(state, quant)
        bits = self.cfg.storage_dtype(state.plan.dtype).itemsize * 8
        weights = sum(_numel(state, name) for name in spectra)
        budget_units = int(self.cfg.budget_bits_per_weight * weights / bits)  # stored numbers
        ranks = allocate_ranks(spectra, budget_units)
        state.plan.lowrank.ranks = ranks
        used = sum(r * spectra[n].cost for n, r in ranks.items()) * bits
        state.report["lowrank_allocation"] = {
            "budget_bits_per_weight": self.cfg.budget_bits_per_weight,
            "used_bits_per_weight": used / weights if weights else 0.0,
            "max_rank": self.cfg.max_rank,
            "ranks": ranks,
            "predicted_error_removed": {
                n: (float(spectra[n].energy[:r].sum()) / spectra[n].total if spectra[n].total else 0.0)
                for n, r in ranks.items()
            },
        }
        log.info(
            "lowrank: ranks %d-%d (median %d) over %d layers at %.3f of %.3f bits/weight",
            min(ranks.values()),
            max(ranks.values()),
            sorted(ranks.values())[len(ranks) // 2],
            len(ranks),
            used / weights,
            self.cfg.budget_bits_per_weight,
        )

    def _spectra(self, state: CompressionState, quant: QuantizePass) -> dict[str, ErrorSpectrum]:
        """Each corrected layer's error spectrum under RTN in its format, on the model as it stands (unchanged)."""
        adapter, cfg = state.adapter, self.cfg
        runner = QuantizeRunner(quant)
        blocks, prefixes = adapter.blocks(state.model), adapter.block_prefixes(state.model)
        dtype = resolve_compute_dtype(state.recipe.calibration.dtype, state.calibration_ids.device)
        chunks = state.calibration_chunks()
        chunks = chunks[: math.ceil(cfg.allocation_samples / state.recipe.calibration.batch_size)]
        sweep = BlockSweep(
            state.model,
            blocks,
            state.ranks.shard(chunks),
            dtype,
            token_clip=quant.hessian_token_clip,
            track_abs=False,
            reduce=state.ranks.reduce_gram,
        )
        spectra: dict[str, ErrorSpectrum] = {}
        residency = state.residency()  # the quantize pass reads each block again: let it go after its spectra
        for i, block in tqdm(sweep, desc="lowrank (error spectra)", unit="block", disable=state.quiet):
            prefix = prefixes[i]
            residency.load_block(i)
            wanted = [
                tuple(n for n in g if _corrected(runner, state, cfg, f"{prefix}.{n}")) for g in adapter.linear_groups
            ]

            def solve(names, stat, block=block, prefix=prefix):
                h = stat.mean()
                for n in names:
                    w = adapter.get_weight(block.get_submodule(n))
                    fmt, _ = runner.layer_format(w.shape[1], runner.scheme_for(state, f"{prefix}.{n}"))
                    error = w - runner.quantize_data_free(w, fmt).dequantize()
                    spectra[f"{prefix}.{n}"] = error_spectrum(error, h, cfg.max_rank, cfg.damp)
                return None  # the weights stay as they are

            sweep.run([g for g in wanted if g], solve)
            residency.release_block(i)
        return spectra


def _corrected(runner: QuantizeRunner, state: CompressionState, cfg: LowRankPass, name: str) -> bool:
    return runner.scheme_for(state, name) is not None and cfg.applies_to(name)


def _numel(state: CompressionState, name: str) -> int:
    w = state.model.get_submodule(name).weight
    return w.shape[0] * w.shape[1]
