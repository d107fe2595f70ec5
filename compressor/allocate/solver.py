"""Multiple-choice knapsack: one choice per item, minimal summed value, summed cost within a budget.

Pure numerics on arrays: `costs[i, j]` (integer bits) and `values[i, j]` (predicted KL) of choice j for item i. An
infinite value marks a choice item i cannot take (e.g. a rank at or above a matrix's break-even rank).
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

DP_MAX_CELLS = 30_000_000


class InfeasibleBudget(ValueError):
    """Even the cheapest choice for every item exceeds the budget."""


def _check(costs: np.ndarray, values: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    costs = np.asarray(costs, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if costs.shape != values.shape or costs.ndim != 2:
        raise ValueError("costs and values must be [items, choices] arrays of one shape")
    if not np.isfinite(values).any(axis=1).all():
        raise ValueError("every item needs at least one choice with a finite value")
    cheapest = int(cheapest_costs(costs, values).sum())
    if cheapest > budget:
        raise InfeasibleBudget(f"the cheapest choices need {cheapest} bits, the budget is {budget}")
    return costs, values


def cheapest_costs(costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each item's cheapest cost among the choices it can take (finite value)."""
    return np.where(np.isfinite(values), costs, np.iinfo(np.int64).max).min(axis=1)


def cheapest_choices(costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each item's cheapest choice among those it can take."""
    return np.where(np.isfinite(values), costs, np.iinfo(np.int64).max).argmin(axis=1)


def total(costs: np.ndarray, values: np.ndarray, choice: np.ndarray) -> tuple[int, float]:
    """(summed cost, summed value) of a choice vector."""
    idx = np.arange(len(choice))
    return int(np.asarray(costs)[idx, choice].sum()), float(np.asarray(values)[idx, choice].sum())


def solve_exact(costs, values, budget: int) -> np.ndarray:
    """Optimal choices: dynamic programming over the budget in units of the costs' gcd, or MILP if that is large.

    Costs are shifted by each item's cheapest choice first, so the table spans only the budget's slack.
    """
    costs, values = _check(costs, values, budget)
    base = cheapest_costs(costs, values)[:, None]
    extra = np.where(np.isfinite(values), costs - base, 0)  # (a choice an item cannot take: its infinite value)
    slack = budget - int(base.sum())
    unit = reduce(math.gcd, (int(c) for c in extra.ravel() if c), 0) or 1
    cells = costs.shape[0] * (slack // unit + 1)
    if cells <= DP_MAX_CELLS:
        return _dp(extra // unit, values, slack // unit)
    return _milp(costs, values, budget)


def _dp(costs: np.ndarray, values: np.ndarray, capacity: int) -> np.ndarray:
    n, m = costs.shape
    best = np.zeros(capacity + 1)  # best[b]: min value of the items so far with total cost <= b
    pick = np.zeros((n, capacity + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(capacity + 1, np.inf)
        for j in range(m):
            c = int(costs[i, j])
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = best[: capacity + 1 - c] + values[i, j]
            better = cand < new
            new[better] = cand[better]
            pick[i, better] = j
        best = new
    choice = np.zeros(n, dtype=np.int64)
    b = capacity
    for i in range(n - 1, -1, -1):
        j = int(pick[i, b])
        choice[i] = j
        b -= int(costs[i, j])
    return choice


def _milp(costs: np.ndarray, values: np.ndarray, budget: int) -> np.ndarray:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, m = costs.shape
    rows = np.repeat(np.arange(n), m)
    one_each = coo_matrix((np.ones(n * m), (rows, np.arange(n * m))), shape=(n, n * m))
    scale = float(costs.max())  # keep coefficients O(1) for the solver's tolerances
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(costs.reshape(1, -1) / scale, -np.inf, budget / scale),
    ]
    allowed = np.isfinite(values)
    res = milp(
        np.where(allowed, values, 0.0).ravel(),
        constraints=constraints,
        integrality=np.ones(n * m),
        bounds=Bounds(0, allowed.ravel().astype(np.float64)),
        options={"mip_rel_gap": 0.0, "time_limit": 120.0},
    )
    if res.x is None:
        return solve_greedy(costs, values, budget)
    choice = res.x.reshape(n, m).argmax(axis=1)
    if total(costs, values, choice)[0] > budget:  # solver tolerance; never hand back an over-budget plan
        return solve_greedy(costs, values, budget)
    return choice


def solve_greedy(costs, values, budget: int) -> np.ndarray:
    """Start from the cheapest choices; repeatedly take the upgrade with the best value drop per extra bit."""
    costs, values = _check(costs, values, budget)
    n = costs.shape[0]
    choice = cheapest_choices(costs, values)
    spent = int(costs[np.arange(n), choice].sum())
    while True:
        cur_c = costs[np.arange(n), choice][:, None]
        cur_v = values[np.arange(n), choice][:, None]
        dc = costs - cur_c
        dv = cur_v - values
        ok = (dc > 0) & (dv > 0) & (dc <= budget - spent)
        free = (dc <= 0) & (dv > 0)  # cheaper and better: always take
        if free.any():
            gain = np.where(free, dv, -np.inf)
        elif ok.any():
            gain = np.where(ok, dv / np.maximum(dc, 1), -np.inf)
        else:
            return choice
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        spent += int(dc[i, j])
        choice[i] = j


def solve_ordering(costs, order: np.ndarray, budget: int) -> np.ndarray:
    """The seed paper's rule: every item starts at its cheapest choice, then items in importance order
    (most important first) each take the most expensive choice the remaining budget allows."""
    costs, _ = _check(costs, np.zeros_like(costs, dtype=np.float64), budget)
    n = costs.shape[0]
    choice = costs.argmin(axis=1)
    spent = int(costs[np.arange(n), choice].sum())
    for i in order:
        affordable = np.where(costs[i] - costs[i, choice[i]] <= budget - spent)[0]
        j = int(affordable[np.argmax(costs[i, affordable])])
        spent += int(costs[i, j] - costs[i, choice[i]])
        choice[i] = j
    return choice
