"""Ranks of a decomposition under a parameter budget: which linears become B A, at which rank, and which stay dense.

`uniform`: every targeted linear keeps the same share of its parameters (its rank that share of its break-even
rank, the rank at which B A stops being smaller than W). The others: an exact knapsack (the `allocate_bits`
solver) over each layer's candidates (ranks on a grid, or dense) by what each rank loses: for `welore` and
`spectrum` the share of the layer's singular-value energy it drops (WeLore's observation that matrices differ
widely in how heavy their spectrum's tail is, so the budget goes to the matrices that compress badly; welore
data-free on W itself, spectrum on the method's own W S); for `measured` the predicted KL of the truncation
(`quant.lowrank.truncation_kl`, the Fisher estimate `allocate_bits` uses). A layer whose spectrum is flat keeps
its dense weight.
"""

from __future__ import annotations

import math

import numpy as np

from ..quant.lowrank import ErrorSpectrum, breakeven_rank
from .solver import solve_exact

DENSE = 0  # the rank recorded for a layer that keeps its dense weight


def rank_grid(out_features: int, in_features: int, step: int) -> list[int]:
    """Candidate ranks: multiples of `step` below the break-even rank (and the break-even rank's own multiple)."""
    top = breakeven_rank(out_features, in_features)
    return list(range(step, top + 1, step)) or ([top] if top > 0 else [])


def uniform_ranks(shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Every layer at the same share of its break-even rank, the largest share whose parameters fit `budget`."""
    dense = sum(o * i for o, i in shapes.values())
    if budget >= dense:
        return dict.fromkeys(shapes, DENSE)

    def ranks_at(share: float) -> dict[str, int]:
        return {n: max(1, math.floor(share * breakeven_rank(o, i))) for n, (o, i) in shapes.items()}

    def cost(ranks: dict[str, int]) -> int:
        return sum(r * sum(shapes[n]) for n, r in ranks.items())

    lo, hi = 0.0, 1.0
    if cost(ranks_at(lo)) > budget:
        raise ValueError("even rank 1 for every layer exceeds the budget")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks_at(mid)) <= budget else (lo, mid)
    return ranks_at(lo)


def share_lost(spectrum: ErrorSpectrum, top: int) -> np.ndarray:
    """[top + 1]: the share of the spectrum's energy a rank-r truncation drops, for r = 0..top."""
    kept = np.concatenate([[0.0], np.cumsum(spectrum.energy.numpy())])
    kept = np.concatenate([kept, np.full(max(0, top + 1 - len(kept)), kept[-1])])[: top + 1]
    return 1.0 - kept / spectrum.total if spectrum.total > 0 else np.zeros(top + 1)


def knapsack_ranks(
    shapes: dict[str, tuple[int, int]], losses: dict[str, np.ndarray], budget: int, step: int
) -> dict[str, int]:
    """Per layer a rank on the grid, or DENSE, minimising the summed loss (`losses[name][r]`: what rank r loses,
    e.g. `share_lost` or a predicted KL; dense loses nothing) with the parameters within `budget` (exact,
    `allocate.solver.solve_exact`)."""
    names = list(shapes)
    grids = {n: rank_grid(*shapes[n], step) for n in names}
    width = 1 + max(len(g) for g in grids.values())
    costs = np.zeros((len(names), width), dtype=np.int64)
    values = np.zeros((len(names), width))
    for k, n in enumerate(names):
        out_f, in_f = shapes[n]
        costs[k, :] = out_f * in_f  # dense (nothing lost); also the padding of shorter grids
        for j, r in enumerate(grids[n], start=1):
            costs[k, j] = r * (out_f + in_f)
            values[k, j] = float(losses[n][min(r, len(losses[n]) - 1)])
    values += 1e-9 * np.abs(values).max(initial=1.0) * costs / costs.max()  # equal losses: the cheaper choice
    choice = solve_exact(costs, values, budget)
    picked = {}
    for k, n in enumerate(names):
        j = int(choice[k])
        picked[n] = grids[n][j - 1] if 1 <= j <= len(grids[n]) else DENSE
    return picked
