"""`method: search`: refine an allocation by real end-to-end KL on held-out calibration samples (EvoPress idea).

A (1+1) evolutionary search bounded by wall time: each step moves one unit up a level and as many units down as
the budget needs (units chosen at random, weighted towards cheap moves), scores the candidate model by KL to the
unquantized model on `search_samples` held-out calibration windows, and keeps it when KL drops. Quantized weights
per (linear, candidate) are made once (RTN; GPTQ needs statistics the sweep has released) and cached in bf16;
`heldout.py` swaps them in and measures.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .error_model import rtn_dequantized
from .heldout import HeldOutKL, held_out_rows

log = logging.getLogger(__name__)


def refine_by_kl(state, units, schemes, quant, choice: np.ndarray, budget: int, cfg, weights) -> np.ndarray:
    """Return an allocation no worse (by measured KL on the held-out samples) than `choice`, within budget."""
    held = held_out_rows(state.calibration_ids, cfg.num_samples, cfg.search_samples)
    unit_of = dict(zip(units.names, units.unit_of))
    deadline = time.perf_counter() + cfg.search_seconds
    rng = np.random.default_rng(state.recipe.calibration.seed)
    with HeldOutKL(state.model, state.adapter, units.names, held, state.residency()) as measure:
        cache: dict[tuple[str, int], torch.Tensor] = {}

        def kl(assign: np.ndarray) -> float:
            def weight_for(n: str) -> torch.Tensor:
                c = int(assign[unit_of[n]])
                if (n, c) not in cache:
                    cache[(n, c)] = rtn_dequantized(measure.original(n), schemes[c], quant).to(torch.bfloat16)
                return cache[(n, c)].float()

            return measure.kl(weight_for)

        best, best_kl = choice.copy(), kl(choice)
        start_kl = best_kl
        steps = accepted = 0
        while time.perf_counter() < deadline:
            cand = _mutate(best, units.costs, budget, rng)
            if cand is None:
                continue
            steps += 1
            score = kl(cand)
            if score < best_kl:
                best, best_kl, accepted = cand, score, accepted + 1
    log.info("allocate_bits search: %d steps, %d accepted, held-out KL %.5f", steps, accepted, best_kl)
    state.report.setdefault("allocation_search", {}).update(
        {
            "steps": steps,
            "accepted": accepted,
            "start_kl": start_kl,
            "held_out_kl": best_kl,
            "held_out_samples": int(held.shape[0]),
        }
    )
    return best


def _mutate(choice: np.ndarray, costs: np.ndarray, budget: int, rng) -> np.ndarray | None:
    """One unit one level up (in cost order), then random units one level down until the budget holds."""
    n = len(choice)
    order = np.argsort(costs, axis=1, kind="stable")  # per unit: choices from cheapest to dearest
    level = np.array([int(np.where(order[i] == choice[i])[0][0]) for i in range(n)])
    up = rng.integers(n)
    if level[up] + 1 >= costs.shape[1]:
        return None
    new_level = level.copy()
    new_level[up] += 1
    new = order[np.arange(n), new_level]
    spent = int(costs[np.arange(n), new].sum())
    candidates = [i for i in rng.permutation(n) if i != up]
    for i in candidates:
        if spent <= budget:
            break
        if new_level[i] == 0:
            continue
        new_level[i] -= 1
        old, new[i] = new[i], order[i, new_level[i]]
        spent += int(costs[i, new[i]] - costs[i, old])
    return new if spent <= budget else None
