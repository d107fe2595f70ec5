"""Pure numerics of block importance: cosine statistics (merged over processes), angular distance, ZD. No model
code here."""

from __future__ import annotations

import math

import torch

from ..calibration.ranks import Ranks
from ..quant.linalg import fixed_order_sum


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token of two [..., hidden] tensors, flattened to [tokens] (float64)."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


class CosineMean:
    """Mergeable mean over tokens of cos(a, b) and of arccos(cos(a, b)) / pi.

    Each `add` (one chunk) keeps its own sums, and the means add them in the order they came: a distributed run
    gathers every rank's `parts` in chunk order (`parts = ...`), so its figures are those of one process."""

    def __init__(self) -> None:
        self.parts: list[tuple[float, float, int]] = []  # per chunk: sum cos, sum angle / pi, tokens

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = token_cosine(a, b)
        angle = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
        self.parts.append((fixed_order_sum(cos), fixed_order_sum(angle), cos.numel()))

    def _mean(self, i: int) -> float:
        total = 0.0
        for part in self.parts:
            total += part[i]
        return total / max(sum(p[2] for p in self.parts), 1)

    @property
    def cosine(self) -> float:
        return self._mean(0)

    @property
    def angular(self) -> float:
        return self._mean(1)


def merge_cosines_over_ranks(means: list[CosineMean], ranks: Ranks) -> None:
    """Every rank's chunk sums of each statistic, in rank (= chunk) order, on every rank."""
    every = ranks.gather([[m.parts for m in means]])
    for i, mean in enumerate(means):
        mean.parts = [part for rank_parts in every for part in rank_parts[i]]


def block_influence(mean_cos: float) -> float:
    """BI = 1 - E[cos(h_in, h_out)] (ShortGPT)."""
    return 1.0 - mean_cos


def lim_score(mean_cos: float) -> float:
    """LIM = -E[cos(h_in, h_out)] (Layer-Wise Quantization); higher means more important."""
    return -mean_cos


def zd_score(weights: list[torch.Tensor]) -> float:
    """ZD: fraction of the weights whose z-score (over all given weights pooled) exceeds 1 in magnitude."""
    flat = torch.cat([w.reshape(-1).double() for w in weights])
    std = flat.std()
    if std == 0:
        return 0.0
    z = (flat - flat.mean()) / std
    return (z.abs() > 1).double().mean().item()


def least_important(scores: list[float], n: int, exclude: set[int] = frozenset()) -> list[int]:
    """Indices of the n lowest scores (ties: lower index first), skipping `exclude`."""
    order = sorted((s, i) for i, s in enumerate(scores) if i not in exclude and not math.isnan(s))
    return sorted(i for _, i in order[:n])


def best_window(distances: list[float]) -> int:
    """Start of the contiguous window with the smallest angular distance d(l, l+n)."""
    return min(range(len(distances)), key=lambda i: (distances[i], i))
