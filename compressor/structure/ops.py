"""The structural operations end to end on a model: score, choose and remove units, choose and fuse windows.

Pass runners (compressor/passes/structure.py) and `compress score` call these; they take the model, its
adapter, the calibration ids and the pass config, and return what they did for the report.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import Residency
from ..calibration.ranks import ONE_PROCESS, Ranks
from ..errors import RecipeError
from ..models.adapters import Adapter
from ..schema.structure import FuseBlocksPass, RemoveBlocksPass, ScorePass
from .family import StructureInfo, branch_module, check_block_surgery, structure_info
from .fuse import Share, fuse_window
from .greedy import greedy_remove
from .metrics import best_window, least_important
from .runner import BlockRunner, Unit, split_rows
from .scores import ScoreTable, activation_scores, compute_scores, weight_scores
from .surgery import remove_blocks, validate_removal, zero_branch

log = logging.getLogger(__name__)


def sample_chunks(ids: torch.Tensor, samples: int | None, rows: int) -> list[torch.Tensor]:
    """The first `samples` calibration windows (all when None), in chunks of `rows` windows."""
    if ids is None or ids.shape[0] == 0:
        raise RecipeError("structural passes need calibration windows", where="calibration", fix="check the source")
    picked = ids if samples is None else ids[:samples]
    return split_rows(picked, rows)


def _check_decoder(adapter: Adapter, what: str) -> None:
    if not adapter.decoder and what in ("loss",):
        raise RecipeError(
            "calibration loss is not defined for an encoder (no next-token prediction)",
            where="passes",
            fix="use objective: kl or a score metric other than loss",
        )


def score_model(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    cfg: ScorePass,
    quiet: bool,
    ranks: Ranks = ONE_PROCESS,
    residency: Residency | None = None,
) -> ScoreTable:
    """Every score the config asks for (measured ones shared out among `ranks` in a distributed run); `residency`
    brings a streamed model's blocks in one at a time."""
    stat_chunks = sample_chunks(ids, cfg.max_samples, cfg.measure_batch_size * 4)
    measure_chunks = sample_chunks(ids, cfg.measure_samples, cfg.measure_batch_size) if cfg.measure else None
    return compute_scores(
        model, adapter, stat_chunks, measure_chunks, cfg.max_distance, cfg.sublayers, quiet, ranks, residency
    )


# ---- remove_blocks ------------------------------------------------------------------------------------
def _metric_scores(
    model,
    adapter,
    ids,
    cfg: RemoveBlocksPass,
    metric: str,
    quiet: bool,
    ranks: Ranks = ONE_PROCESS,
    residency: Residency | None = None,
) -> list[float]:
    kind = cfg.kind
    sublayers = kind != "block"
    if metric == "zd":
        table = ScoreTable(depth=len(adapter.blocks(model)))
        if sublayers:
            table.sublayers = {"attention": {}, "mlp": {}}
        weight_scores(adapter, adapter.blocks(model), table, sublayers, residency)
        return table.metric("zd", kind)
    if metric in ("loss", "kl"):
        _check_decoder(adapter, metric)
        chunks = sample_chunks(ids, cfg.measure_samples, cfg.measure_batch_size)
        runner = BlockRunner(model, adapter, chunks, residency=residency)
        from .scores import measured_scores

        _, measured = measured_scores(runner, [(i, kind) for i in range(runner.depth)], quiet, ranks)
        pick = 0 if metric == "loss" else 1
        return [measured[(i, kind)][pick] for i in range(runner.depth)]
    chunks = ranks.shard(sample_chunks(ids, cfg.max_samples, cfg.measure_batch_size * 4), allow_empty=True)
    runner = BlockRunner(model, adapter, chunks, False, residency=residency)
    table = ScoreTable(depth=runner.depth)
    if sublayers:
        table.sublayers = {"attention": {}, "mlp": {}}
    activation_scores(runner, table, 1, sublayers, quiet, ranks)
    return table.metric(metric, kind)


def choose_removal(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor | None,
    cfg: RemoveBlocksPass,
    quiet: bool,
    ranks: Ranks = ONE_PROCESS,
    residency: Residency | None = None,
) -> tuple[list[Unit], dict]:
    """The units the config removes, and details for the report (scores, greedy steps, window); `residency` brings
    a streamed model's blocks in one at a time."""
    depth = len(adapter.blocks(model))
    kind = cfg.kind
    if kind == "block":
        check_block_surgery(adapter, model)
    else:
        branch_module(adapter, model, kind)  # refuses families without isolatable branches
    if cfg.blocks is not None:
        chosen = validate_removal(depth, cfg.blocks, "remove_blocks.blocks") if kind == "block" else cfg.blocks
        return [(i, kind) for i in chosen], {}
    n = cfg.amount(depth)
    limit = depth - 1 if kind == "block" else depth
    if n > limit:
        raise RecipeError(
            f"cannot remove {n} {kind} units from a model with {depth} blocks",
            where="remove_blocks.count",
            fix=f"remove at most {limit} (a model keeps at least one block)",
        )
    if cfg.method == "greedy":
        _check_decoder(adapter, cfg.objective)
        chunks = sample_chunks(ids, cfg.measure_samples, cfg.measure_batch_size)
        runner = BlockRunner(model, adapter, chunks, residency=residency)
        units, steps = greedy_remove(runner, n, (kind,), cfg.objective, cfg.shortlist, quiet, ranks)
        return units, {"greedy_steps": steps}
    if cfg.method == "contiguous":
        chunks = ranks.shard(sample_chunks(ids, cfg.max_samples, cfg.measure_batch_size * 4), allow_empty=True)
        runner = BlockRunner(model, adapter, chunks, False, residency=residency)
        table = ScoreTable(depth=depth)
        activation_scores(runner, table, n, False, quiet, ranks)
        distances = table.angular[n]
        start = best_window(distances)
        return [(i, "block") for i in range(start, start + n)], {"window_start": start, "distances": distances}
    metric = cfg.method.split(":", 1)[1]
    values = _metric_scores(model, adapter, ids, cfg, metric, quiet, ranks, residency)
    return [(i, kind) for i in least_important(values, n)], {"metric": metric, "scores": values}


def apply_removal(model: nn.Module, adapter: Adapter, units: list[Unit], residency: Residency | None = None) -> dict:
    """Delete the chosen blocks, or zero the chosen branches (each block brought in by `residency` to be changed);
    returns what changed. A streamed model's checkpoint keys must then follow the renumbered blocks
    (`CompressionState.follow_block_removal`)."""
    residency = residency or Residency()
    blocks = sorted(i for i, k in units if k == "block")
    branches = sorted((i, k) for i, k in units if k != "block")
    result: dict = {"depth_before": len(adapter.blocks(model))}
    if branches:
        result["zeroed"] = []
        for i, k in branches:
            residency.load_block(i)
            result["zeroed"].append(zero_branch(model, adapter, i, k))
            residency.release_block(i)
    if blocks:
        result["removed_blocks"] = blocks
        result["kept_blocks"] = remove_blocks(model, adapter, blocks)
    result["depth_after"] = len(adapter.blocks(model))
    return result


# ---- fuse_blocks --------------------------------------------------------------------------------------
def _windows_by_angle(distances: list[float], size: int, merges: int, depth: int) -> list[int]:
    """Starts of `merges` non-overlapping windows of `size` blocks with the smallest d(l, l+size)."""
    chosen: list[int] = []
    for start in sorted(range(len(distances)), key=lambda i: (distances[i], i)):
        if start + size > depth or any(abs(start - c) < size for c in chosen):
            continue
        chosen.append(start)
        if len(chosen) == merges:
            break
    return chosen


def fuse_blocks(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    cfg: FuseBlocksPass,
    quiet: bool,
    residency: Residency | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> dict:
    """Choose windows, merge each (top-down, so every merge's calibration input is still exact), delete the
    absorbed blocks; returns what changed. `residency` brings a streamed model's blocks in as they run (a window
    being merged is held together); a merged block stays resident. In a distributed run each rank runs its share
    of the windows and the statistics, fits and checks are merged over the ranks.

    Windows come from `cfg.start`, the smallest angular distances (`select: angular`; merged after choosing), or a
    LaCo walk down from the top (each trial merge kept when the final hidden states stay close enough).
    """
    check_block_surgery(adapter, model)
    depth = len(adapter.blocks(model))
    m = cfg.group_size
    info = structure_info(adapter, model)
    merges = _merge_count(cfg, depth)
    correct = cfg.correct and info.linear_branches
    if cfg.correct and not correct:
        log.warning(
            "fuse_blocks: least-squares correction needs linear branch outputs; %s merges without it",
            model.config.model_type,
        )
    ridge = cfg.ridge if correct else None
    details: dict = {"group_size": m, "corrected": correct}
    if cfg.start is not None or cfg.select == "angular":
        starts, details["fits"] = _fuse_chosen_windows(
            model, adapter, ids, cfg, info, depth, merges, ridge, quiet, residency, ranks
        )
    else:
        chunks, share = _shared(sample_chunks(ids, cfg.measure_samples, cfg.measure_batch_size), ranks)
        runner = BlockRunner(model, adapter, chunks, residency=residency)
        starts = _laco_walk(runner, adapter, info, m, merges, cfg.threshold, ridge, quiet, share)
        details["threshold"] = cfg.threshold
    absorbed = sorted(s + k for s in starts for k in range(1, m))
    details["merged_windows"] = [[s, s + m - 1] for s in sorted(starts)]
    details.update(apply_removal(model, adapter, [(i, "block") for i in absorbed], residency))
    return details


def _merge_count(cfg: FuseBlocksPass, depth: int) -> int:
    """How many windows of `cfg.group_size` blocks to merge (1 with a fixed start); refuses counts that do not fit."""
    m = cfg.group_size
    if cfg.start is not None:
        if cfg.start + m > depth:
            raise RecipeError(
                f"a merge of {m} blocks from block {cfg.start} runs past the last block ({depth - 1})",
                where="fuse_blocks.start",
                fix=f"start at most at block {depth - m}",
            )
        return 1
    removed = cfg.amount(depth)
    if removed % (m - 1):
        raise RecipeError(
            f"merging groups of {m} removes {m - 1} blocks each, so {removed} blocks cannot be removed",
            where="fuse_blocks.count",
            fix=f"use a count that is a multiple of {m - 1}",
        )
    merges = removed // (m - 1)
    if removed >= depth or merges * m > depth:
        raise RecipeError(
            f"{merges} merges of {m} blocks do not fit in {depth} blocks",
            where="fuse_blocks.count",
            fix="fuse fewer blocks or use a smaller group_size",
        )
    return merges


def _fuse_chosen_windows(
    model: nn.Module,
    adapter: Adapter,
    ids: torch.Tensor,
    cfg: FuseBlocksPass,
    info: StructureInfo,
    depth: int,
    merges: int,
    ridge: float | str | None,
    quiet: bool,
    residency: Residency | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> tuple[list[int], list[dict]]:
    """Merge the window at `cfg.start`, or the `merges` non-overlapping windows of smallest angular distance,
    top-down; returns their starts and per window its fit (starting point, r, held-out error), by start."""
    m = cfg.group_size
    # the correction fits on the statistics windows (no reference logits needed here)
    chunks, share = _shared(sample_chunks(ids, cfg.max_samples, cfg.measure_batch_size * 4), ranks)
    runner = BlockRunner(model, adapter, chunks, False, residency=residency)
    if cfg.start is not None:
        starts = [cfg.start]
    else:
        table = ScoreTable(depth=depth)
        activation_scores(runner, table, m, False, quiet, ranks)
        starts = _windows_by_angle(table.angular[m], m, merges, depth)
        if len(starts) < merges:
            raise RecipeError(f"found only {len(starts)} non-overlapping windows", where="fuse_blocks")
    states = runner.inputs(last=max(starts), keep=set(starts))
    fits = []
    for start in tqdm(sorted(starts, reverse=True), desc="fuse", unit="merge", disable=quiet):
        with runner.holding(range(start, start + m)):
            fits.append(
                fuse_window(runner, adapter, start, m, states[start], info.attention_out, info.mlp_out, ridge, share)
            )
    return starts, sorted(fits, key=lambda f: f["start"])


def _shared(chunks: list[torch.Tensor], ranks: Ranks) -> tuple[list[torch.Tensor], Share]:
    """This rank's share of `chunks` (whole chunks, possibly none) and where its windows lie among all of them."""
    lo, hi = ranks.share_bounds(len(chunks))
    first = sum(c.shape[0] for c in chunks[:lo])
    return list(chunks[lo:hi]), Share(ranks, first, sum(c.shape[0] for c in chunks))


def _laco_walk(
    runner: BlockRunner, adapter, info, m: int, merges: int, threshold: float, ridge, quiet, share: Share
) -> list[int]:
    """LaCo: from the top, merge [l, l+m) if the final hidden states keep cosine >= threshold; then step down."""
    states = runner.inputs()
    removed: set[Unit] = set()
    starts: list[int] = []
    trace = []
    start = runner.depth - m
    progress = tqdm(total=merges, desc="fuse (check)", unit="merge", disable=quiet)
    while start >= 0 and len(starts) < merges:
        block = runner.blocks[start]
        with runner.holding(range(start, start + m)):
            saved = {k: v.clone() for k, v in block.state_dict().items()}
            fuse_window(runner, adapter, start, m, states[start], info.attention_out, info.mlp_out, ridge, share)
            trial = removed | {(start + k, "block") for k in range(1, m)}
            cos = runner.score(runner.run(start, states[start], trial), merge=share.ranks.gather).cosine
            trace.append((start, cos))
            if cos < threshold:
                block.load_state_dict(saved)
        if cos >= threshold:
            removed, starts = trial, starts + [start]
            start -= m
            progress.update(1)
        else:
            start -= 1
    progress.close()
    if len(starts) < merges:
        raise RecipeError(
            f"only {len(starts)} of {merges} merges keep the final-state cosine >= {threshold} "
            f"(tried: {', '.join(f'{s}:{c:.3f}' for s, c in trace)})",
            where="fuse_blocks.threshold",
            fix="lower the threshold, fuse fewer blocks, or use select: angular",
        )
    return starts
