"""`method: search`: refine an allocation by real end-to-end KL on held-out calibration samples (EvoPress idea).

A (1+1) evolutionary search bounded by wall time: each step moves one unit up a level and as many units down as
the budget needs (units chosen at random, weighted towards cheap moves), scores the candidate model by KL to the
unquantized model on `search_samples` held-out calibration windows, and keeps it when KL drops. Quantized weights
per (linear, candidate) are made once (RTN; GPTQ needs statistics the sweep has released) and cached in bf16.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..quant.formats import resolve_format
from ..techniques import RtnConfig, quantize_data_free

log = logging.getLogger(__name__)


def _dequantized(w: torch.Tensor, scheme, quant) -> torch.Tensor:
    """What RTN (or FP8 scaling) makes of w under `scheme`, dequantized (w itself for a float candidate)."""
    if scheme is None:
        return w
    fmt, _ = resolve_format(scheme, w.shape[1], quant.group_policy)
    return quantize_data_free(w, fmt, RtnConfig.of(quant)).dequantize()


def refine_by_kl(state, units, schemes, quant, choice: np.ndarray, budget: int, cfg, weights) -> np.ndarray:
    """Return an allocation no worse (by measured KL on the held-out samples) than `choice`, within budget."""
    model, adapter = state.full_model(), state.adapter
    ids = state.calibration_ids
    start_row = min(cfg.num_samples, max(ids.shape[0] - cfg.search_samples, 0))
    held = ids[start_row : start_row + cfg.search_samples]
    modules = {n: model.get_submodule(n) for n in units.names}
    originals = {n: adapter.get_weight(m) for n, m in modules.items()}
    cache: dict[tuple[str, int], torch.Tensor] = {}
    deadline = time.perf_counter() + cfg.search_seconds
    rng = np.random.default_rng(state.recipe.calibration.seed)

    def forward_logp() -> torch.Tensor:
        with torch.inference_mode():
            out = model(input_ids=held, attention_mask=torch.ones_like(held), use_cache=False)
            return F.log_softmax(out.logits.float(), dim=-1)

    def apply(assign: np.ndarray) -> None:
        for li, n in enumerate(units.names):
            c = int(assign[units.unit_of[li]])
            if (n, c) not in cache:
                cache[(n, c)] = _dequantized(originals[n], schemes[c], quant).to(torch.bfloat16)
            adapter.set_weight(modules[n], cache[(n, c)].float())

    base_logp = forward_logp().to(torch.bfloat16)

    def kl(assign: np.ndarray) -> float:
        apply(assign)
        logp = forward_logp()
        p = base_logp.float()
        return float((p.exp() * (p - logp)).sum(-1).mean())

    costs = units.costs
    best, best_kl = choice.copy(), kl(choice)
    start_kl = best_kl
    steps = accepted = 0
    try:
        while time.perf_counter() < deadline:
            cand = _mutate(best, costs, budget, rng)
            if cand is None:
                continue
            steps += 1
            score = kl(cand)
            if score < best_kl:
                best, best_kl, accepted = cand, score, accepted + 1
    finally:
        for n, m in modules.items():
            adapter.set_weight(m, originals[n])
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
