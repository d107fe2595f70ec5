"""Checks of an allocation against measured end-to-end KL (`allocate_bits.check`).

- The sensitivity model: on a few probe linears, the predicted KL of one candidate against the KL measured with
  only that linear swapped in; reported as Spearman's rank correlation (the knapsack only needs the ranking right).
- The safe fallback: the chosen mix against every uniform allocation (one candidate everywhere) that fits the
  budget, all measured the same way with the weights the error model makes (for `gptq` solved as the quantize
  pass solves, see `error_model.py`); a uniform allocation that measures lower replaces the mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from .heldout import BlockStep, HeldOutKL


@dataclass
class Probe:
    """One probe linear: the candidate it is probed at, its predicted KL and that candidate's dequantized weight."""

    name: str
    candidate: str
    predicted: float
    dequantized: torch.Tensor


def pick_probes(names: list[str], count: int) -> list[int]:
    """Indices of `count` linears spread over the kinds of linear (cycled) and, within a kind, over depth."""
    if count >= len(names):
        return list(range(len(names)))
    kind_of = [n.rsplit(".", 1)[-1] for n in names]
    kinds = list(dict.fromkeys(kind_of))
    taken: list[int] = []
    for k in range(count):
        free = [i for i, kind in enumerate(kind_of) if kind == kinds[k % len(kinds)] and i not in taken]
        free = free or [i for i in range(len(names)) if i not in taken]
        taken.append(free[round(k / max(count - 1, 1) * (len(free) - 1))])
    return sorted(taken)


def rank_correlation(predicted: list[float], measured: list[float]) -> float | None:
    """Spearman's rank correlation, None where it is undefined (fewer than two pairs, or one side constant)."""
    if len(predicted) < 2 or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    return float(spearmanr(predicted, measured).statistic)


def probe_check(measure: HeldOutKL, probes: list[Probe]) -> dict:
    """Each probe's predicted and measured KL (only that linear swapped in) and their rank correlation."""
    pairs = []
    for p in probes:
        measured = measure.kl(lambda n, p=p: p.dequantized if n == p.name else None, names=[p.name])
        pairs.append({"name": p.name, "candidate": p.candidate, "predicted_kl": p.predicted, "measured_kl": measured})
    return {
        "rank_correlation": rank_correlation([q["predicted_kl"] for q in pairs], [q["measured_kl"] for q in pairs]),
        "samples": measure.samples,
        "probes": pairs,
    }


def choose_safe_allocation(mix_kl: float, uniform_kls: dict[str, float]) -> str | None:
    """The uniform candidate to use instead of the mix: the lowest-KL one if it measures below the mix, else None."""
    if not uniform_kls:
        return None
    best = min(uniform_kls, key=uniform_kls.__getitem__)
    return best if uniform_kls[best] < mix_kl else None


def compare_uniform(
    measure: HeldOutKL,
    swap_in: Callable[[Callable[[str], int]], BlockStep],
    mix: dict[str, int],
    uniform: dict[str, int],
    weights: str,
    quiet: bool = True,
) -> dict:
    """Measured KL of the mix (linear -> candidate index) and of each uniform allocation (label -> candidate
    index), each made block by block by the step `swap_in(candidate_of)` returns (`weights` says how, for the
    record), one at a time; the decision of `choose_safe_allocation` with its reason.
    A progress bar (one step per allocation: with GPTQ weights each is a pass over every block) unless `quiet`."""
    progress = tqdm(total=1 + len(uniform), desc=f"allocation fallback ({weights})", unit="alloc", disable=quiet)

    def of(label: str, candidate_of: Callable[[str], int]) -> float:
        progress.set_postfix_str(label)
        kl = measure.kl_by_block(swap_in(candidate_of))
        progress.update(1)
        return kl

    with progress:
        mix_kl = of("mix", mix.__getitem__)
        uniform_kls = {label: of(label, lambda n, c=c: c) for label, c in uniform.items()}
    pick = choose_safe_allocation(mix_kl, uniform_kls)
    reason = (
        f"uniform '{pick}' measured lower held-out KL ({uniform_kls[pick]:.5g}) than the mix ({mix_kl:.5g})"
        if pick
        else None
    )
    return {
        "used": pick is not None,
        "candidate": pick,
        "reason": reason,
        "mix_kl": mix_kl,
        "uniform": uniform_kls,
        "samples": measure.samples,
        "weights": weights,
    }


def fitting_uniform(costs: np.ndarray, values: np.ndarray, labels: list[str], budget: int) -> list[int]:
    """Candidates whose uniform allocation (that candidate for every unit) fits the budget, among those every unit
    can take (finite value)."""
    return [c for c in range(len(labels)) if int(costs[:, c].sum()) <= budget and bool(np.isfinite(values[:, c]).all())]
