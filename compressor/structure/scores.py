"""Block and sublayer importance from one calibration sweep, plus measured skip loss / KL (SLEB-style).

Metrics per block (and per attention / MLP branch where the family isolates them):
- `bi`: 1 - mean cos(h_in, h_out) (ShortGPT);  `lim`: -mean cos(h_in, h_out) (Layer-Wise Quantization);
- `angular`: arccos(cos(h_l, h_{l+1})) / pi; the table also holds d(l, l+n) for n up to `max_distance`;
- `zd`: fraction of the block's linear weights with |z-score| > 1 (Layer-Wise Quantization);
- `loss` / `kl`: increase of calibration loss and KL to the base model when the unit alone is skipped,
  from the cached input of its block (blocks before it are not rerun).
For every metric, a higher value means a more important unit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import Residency
from ..calibration.ranks import ONE_PROCESS, Ranks
from ..models.adapters import Adapter
from .metrics import CosineMean, block_influence, lim_score, merge_cosines_over_ranks, zd_score
from .runner import BlockRunner, Capture, Unit

SUBLAYERS = ("attention", "mlp")
METRICS = ("bi", "lim", "angular", "zd", "loss", "kl")


@dataclass
class ScoreTable:
    """Scores per block (`blocks[metric][i]`), per branch (`sublayers[kind][metric][i]`), angular windows."""

    depth: int
    blocks: dict[str, list[float]] = field(default_factory=dict)
    sublayers: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    angular: dict[int, list[float]] = field(default_factory=dict)  # n -> d(l, l+n), l = 0..depth-n
    base_loss: float | None = None
    tokens: dict[str, int] = field(default_factory=dict)

    def metric(self, name: str, kind: str = "block") -> list[float]:
        table = self.blocks if kind == "block" else self.sublayers.get(kind, {})
        return table[name]

    def to_json(self) -> dict:
        def clean(values):
            return [None if (v is None or math.isnan(v)) else round(v, 6) for v in values]

        return {
            "depth": self.depth,
            "higher_is_more_important": True,
            "blocks": {k: clean(v) for k, v in self.blocks.items()},
            "sublayers": {s: {k: clean(v) for k, v in t.items()} for s, t in self.sublayers.items()},
            "angular_distance": {str(n): clean(v) for n, v in self.angular.items()},
            "base_loss": self.base_loss,
            "tokens": self.tokens,
        }


def _linear_weights(adapter: Adapter, block: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    return [adapter.get_weight(block.get_submodule(n)) for n in names]


def weight_scores(
    adapter: Adapter, blocks: nn.ModuleList, table: ScoreTable, sublayers: bool, residency: Residency | None = None
) -> None:
    """ZD per block and, when branches are scored, per attention (first two groups) / MLP (last two) linears (a
    block at a time, brought in by `residency` for a streamed model)."""
    residency = residency or Residency()
    groups = adapter.linear_groups
    halves = {"attention": [n for g in groups[:2] for n in g], "mlp": [n for g in groups[2:] for n in g]}
    zd: dict[str, list[float]] = {"block": [], **({k: [] for k in halves} if sublayers else {})}
    for i, block in enumerate(blocks):
        residency.load_block(i)
        zd["block"].append(zd_score(_linear_weights(adapter, block, adapter.linear_names())))
        for kind in halves if sublayers else ():
            zd[kind].append(zd_score(_linear_weights(adapter, block, halves[kind])))
        residency.release_block(i)
    table.blocks["zd"] = zd["block"]
    for kind in halves if sublayers else ():
        table.sublayers[kind]["zd"] = zd[kind]


@torch.inference_mode()
def activation_scores(
    runner: BlockRunner, table: ScoreTable, max_distance: int, sublayers: bool, quiet: bool, ranks: Ranks = ONE_PROCESS
):
    """One sweep over the blocks: BI / LIM / angular per block and branch, and d(l, l+n) for n <= max_distance.
    In a distributed run the runner holds this rank's share of the chunks and `ranks` merges the statistics."""
    depth = runner.depth
    max_distance = min(max_distance, depth)
    windows = {n: [CosineMean() for _ in range(depth - n + 1)] for n in range(1, max_distance + 1)}
    branch_stats = {k: [CosineMean() for _ in range(depth)] for k in SUBLAYERS}
    recent: deque[list[torch.Tensor]] = deque(maxlen=max_distance + 1)
    hidden = runner.calls.hidden
    recent.append(hidden)
    mlp_name = runner.info.branch("mlp") if sublayers else None
    for i in tqdm(range(depth), desc="score (sweep)", unit="block", disable=quiet):
        capture = Capture(runner.blocks[i].get_submodule(mlp_name), inputs=False) if mlp_name else None
        runner.residency.load_block(i)
        try:
            out = runner.run_block(i, hidden)
        finally:
            if capture is not None:
                capture.remove()
        runner.residency.release_block(i)
        if capture is not None:
            for h_in, h_out, branch in zip(hidden, out, capture.outputs):
                mid = h_out - branch.reshape(h_out.shape)
                branch_stats["attention"][i].add(h_in, mid)
                branch_stats["mlp"][i].add(mid, h_out)
        recent.append(out)
        for n in windows:
            if len(recent) > n:
                start = i + 1 - n
                for a, b in zip(recent[-1 - n], out):
                    windows[n][start].add(a, b)
        hidden = out
    if ranks.distributed:
        merge_cosines_over_ranks([m for ms in (*windows.values(), *branch_stats.values()) for m in ms], ranks)
    cos = [w.cosine for w in windows[1]]
    table.blocks["bi"] = [block_influence(c) for c in cos]
    table.blocks["lim"] = [lim_score(c) for c in cos]
    table.blocks["angular"] = [w.angular for w in windows[1]]
    table.angular = {n: [w.angular for w in ws] for n, ws in windows.items()}
    if sublayers:
        for kind, stats in branch_stats.items():
            table.sublayers[kind]["bi"] = [block_influence(s.cosine) for s in stats]
            table.sublayers[kind]["lim"] = [lim_score(s.cosine) for s in stats]
            table.sublayers[kind]["angular"] = [s.angular for s in stats]


def measured_scores(
    runner: BlockRunner, units: Sequence[Unit], quiet: bool = False, ranks: Ranks = ONE_PROCESS
) -> tuple[float, dict]:
    """Base loss, and {unit: (loss increase, KL to base)} when each unit alone is skipped. In a distributed run
    the units are shared out among the ranks (`Ranks.run_assigned`)."""
    states = runner.inputs()
    base = runner.score(states[-1])

    def skipped(unit: Unit):
        return runner.score(runner.run(unit[0], states[unit[0]], {unit}))

    jobs = [(runner.depth - unit[0], partial(skipped, unit)) for unit in units]  # cost: blocks run
    with tqdm(total=len(units), desc="score (skip each)", unit="unit", disable=quiet) as bar:
        scores = ranks.run_assigned(jobs, bar.update)
    return base.loss, {unit: (s.loss - base.loss, s.kl) for unit, s in zip(units, scores)}


def compute_scores(
    model: nn.Module,
    adapter: Adapter,
    stat_chunks: Sequence[torch.Tensor],
    measure_chunks: Sequence[torch.Tensor] | None,
    max_distance: int = 8,
    sublayers: bool = True,
    quiet: bool = False,
    ranks: Ranks = ONE_PROCESS,
    residency: Residency | None = None,
) -> ScoreTable:
    """Every metric of this module for the model's blocks (measured ones only when `measure_chunks` is given);
    `residency` brings a streamed model's blocks in one at a time."""
    mine = ranks.shard(stat_chunks, allow_empty=True)
    stats_runner = BlockRunner(model, adapter, mine, reference=False, residency=residency)
    sublayers = sublayers and stats_runner.info.attention_out is not None
    table = ScoreTable(depth=stats_runner.depth)
    table.tokens["statistics"] = int(sum(c.numel() for c in stat_chunks))
    if sublayers:
        table.sublayers = {k: {} for k in SUBLAYERS}
    activation_scores(stats_runner, table, max_distance, sublayers, quiet, ranks)
    del stats_runner
    weight_scores(adapter, adapter.blocks(model), table, sublayers, residency)
    if measure_chunks:
        runner = BlockRunner(model, adapter, measure_chunks, residency=residency)
        table.tokens["measured"] = int(sum(c.numel() for c in measure_chunks))
        kinds = ("block", *SUBLAYERS) if sublayers else ("block",)
        units = [(i, k) for k in kinds for i in range(runner.depth)]
        base_loss, measured = measured_scores(runner, units, quiet, ranks)
        table.base_loss = None if math.isnan(base_loss) else base_loss
        for kind in kinds:
            target = table.blocks if kind == "block" else table.sublayers[kind]
            target["loss"] = [measured[(i, kind)][0] for i in range(runner.depth)]
            target["kl"] = [measured[(i, kind)][1] for i in range(runner.depth)]
    return table
