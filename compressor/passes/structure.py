"""Structural passes `score`, `remove_blocks`, `fuse_blocks`: thin runners over compressor.structure."""

from __future__ import annotations

import logging

from ..plan import BlockChange
from ..schema import FuseBlocksPass, RemoveBlocksPass, ScorePass
from ..state import CompressionState
from ..structure.ops import apply_removal, choose_removal, fuse_blocks, score_model
from ..structure.report import score_plot_png, score_table_text
from .base import register

log = logging.getLogger(__name__)


def _record(state: CompressionState, entry: dict) -> None:
    """The pass's details go to the report; what it changed in the model to the plan."""
    state.report.setdefault("structure", []).append(entry)
    state.plan.blocks.append(BlockChange.of(entry["pass"], entry))


@register(ScorePass)
class ScoreRunner:
    def __init__(self, config: ScorePass) -> None:
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        table = score_model(
            state.model, state.adapter, state.calibration_ids, self.cfg, state.quiet, state.ranks, state.residency()
        )
        state.report["scores"] = table.to_json()
        if self.cfg.plot:
            state.extra_files["scores.png"] = score_plot_png(table)
        log.info("block scores:\n%s", score_table_text(table))


@register(RemoveBlocksPass)
class RemoveBlocksRunner:
    def __init__(self, config: RemoveBlocksPass) -> None:
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        model, ids, residency = state.model, state.calibration_ids, state.residency()
        units, details = choose_removal(model, state.adapter, ids, self.cfg, state.quiet, state.ranks, residency)
        done = _removed(state, lambda: apply_removal(model, state.adapter, units, state.residency()))
        log.info("remove_blocks (%s): %s", self.cfg.method, [list(u) for u in units])
        _record(state, {"pass": "remove_blocks", "method": self.cfg.method, "kind": self.cfg.kind, **done, **details})


@register(FuseBlocksPass)
class FuseBlocksRunner:
    def __init__(self, config: FuseBlocksPass) -> None:
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        ids, residency = state.calibration_ids, state.residency()
        done = _removed(
            state, lambda: fuse_blocks(state.model, state.adapter, ids, self.cfg, state.quiet, residency, state.ranks)
        )
        log.info("fuse_blocks: merged %s", done["merged_windows"])
        _record(state, {"pass": "fuse_blocks", "select": self.cfg.select, **done})


def _removed(state: CompressionState, surgery) -> dict:
    """Run `surgery` (which deletes blocks and returns what it did); a streamed model's checkpoint keys then follow
    the renumbered blocks."""
    before = state.adapter.block_prefixes(state.model)
    done = surgery()
    if "kept_blocks" in done:
        state.follow_block_removal(before, done["kept_blocks"])
    return done
