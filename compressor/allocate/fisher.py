"""Kronecker-factored Fisher statistics of every block linear, block by block (`calibration.gradients`).

For a linear y = W x, a weight error dW changes the outputs by dy = dW x. To second order, the KL divergence of
the model's next-token distribution from the unquantized one is 0.5 E[(g . dy)^2], where g is the gradient of
log p(y_hat) w.r.t. the layer output with y_hat sampled from the model itself (the Fisher identity). Assuming g
and x independent (K-FAC) this is

    KL(dW) ~= 0.5 * tr(G dW H dW^T),   G = E[g g^T] (out x out),   H = E[x x^T] (in x in),

with expectations over calibration tokens. Approximated: cross-token and cross-layer terms are dropped (each
layer's error is scored alone, contributions add up), and the statistics come from the unquantized model.
With `token_clip`, tokens whose input norm exceeds `token_clip` x their window's median enter H capped (off unless
the quantize pass sets `hessian_token_clip`).

The sweep (`calibration.gradients.GradientSweep`) stores block-boundary activations, then runs the backward one
block at a time from the last, so one block's weights and statistics are resident at a time, and yields each
block's statistics as it finishes it. Sums are float64 over per-window float32 products (`GramStat`): the
statistics are the same whichever process computed which windows, and each window draws its sampled tokens from
a generator seeded by its own index. With `compute_dtype` bfloat16 the forwards run under autocast and the Gram
products take bfloat16 inputs with float32 accumulation. The forward also records each block's LIM score
(negative cosine of block input and output).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import Residency
from ..calibration.gradients import GradientSweep
from ..calibration.ranks import ONE_PROCESS, Ranks
from ..quant.linalg import fixed_order_sum
from ..structure.metrics import CosineMean, lim_score, merge_cosines_over_ranks


@dataclass
class BlockFisher:
    """One block's per-token statistics (float32): H per input-sharing group and G per linear (full names)."""

    index: int
    h: dict[str, torch.Tensor]  # key of the group's H (its first linear) -> H [in, in]
    g: dict[str, torch.Tensor]  # linear -> G [out, out]
    h_key: dict[str, str]  # linear -> key of its H

    def input_gram(self, name: str) -> torch.Tensor:
        return self.h[self.h_key[name]]


class FisherSweep:
    """The sensitivity sweep over calibration windows `ids` [samples, seq] (this process takes its share).

        sweep = FisherSweep(model, blocks, prefixes, groups, ids, seed=..., ranks=..., residency=...)
        lim = sweep.lim_scores()       # the forward: block LIM scores (every window, every process)
        for block in sweep.blocks():   # the backward, last block first: BlockFisher per block
            ...

    `groups` are the adapter's input-sharing linear groups (names relative to a block). Statistics are in the
    [out, in] orientation whatever the module stores (GPT-2's Conv1D hooks see the same x and y)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        prefixes: list[str],
        groups: list[tuple[str, ...]],
        ids: torch.Tensor,
        *,
        seed: int = 0,
        quiet: bool = False,
        token_clip: float | None = None,
        compute_dtype: torch.dtype = torch.float32,
        ranks: Ranks = ONE_PROCESS,
        residency: Residency | None = None,
    ):
        self.prefixes, self.groups, self.ranks, self.quiet = prefixes, groups, ranks, quiet
        mine = ranks.shard(list(enumerate(ids)), "sensitivity")
        self.sweep = GradientSweep(
            model,
            blocks,
            [row for _, row in mine],
            [index for index, _ in mine],
            groups,
            _sampled_log_likelihood(seed),
            compute_dtype=compute_dtype,
            token_clip=token_clip,
            reduce=ranks.reduce_gram,
            residency=residency,
        )
        self.cosines = [CosineMean() for _ in blocks]

    def close(self) -> None:
        """Delete the stored boundaries (`blocks()` does when it ends; a sweep used for LIM scores only must)."""
        self.sweep.close()

    def lim_scores(self) -> list[float]:
        """Run the forward (boundaries stored); each block's LIM score over every window."""
        with tqdm(total=len(self.cosines), desc="sensitivity (forward)", unit="block", disable=self.quiet) as bar:

            def observe(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
                self.cosines[i].add(x_in, x_out)
                if len(self.cosines[i].parts) == len(self.sweep.windows):
                    bar.update(1)

            self.sweep.forward(observe)
        merge_cosines_over_ranks(self.cosines, self.ranks)
        return [lim_score(c.cosine) for c in self.cosines]

    def blocks(self) -> Iterator[BlockFisher]:
        """Each block's statistics, last block first, while that block's weights are resident."""
        try:
            backward = self.sweep.backward()
            for grams in tqdm(backward, total=len(self.prefixes), desc="sensitivity (backward)", disable=self.quiet):
                prefix = self.prefixes[grams.index]
                h_key = {f"{prefix}.{n}": f"{prefix}.{g[0]}" for g in self.groups for n in g}
                yield BlockFisher(
                    grams.index,
                    {f"{prefix}.{k}": stat.mean() for k, stat in grams.inputs.items()},
                    {f"{prefix}.{k}": stat.mean() for k, stat in grams.outputs.items()},
                    h_key,
                )
        finally:
            self.close()


def _sampled_log_likelihood(seed: int):
    """The objective whose gradients make the Fisher: log p of tokens drawn from the model's own distribution, by a
    generator seeded from the window's index (the same draws on whichever process runs the window)."""

    def objective(logits: torch.Tensor, index: int) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (1 << 63))
        sampled = _sample_tokens(logp.detach(), gen)
        return logp.gather(1, sampled).sum()

    return objective


def _sample_tokens(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of log-probabilities [tokens, vocab], drawn from exp(logp) by inverse CDF (cumsum +
    searchsorted: the same distribution as torch.multinomial at a fraction of its cost on a 49k vocabulary)."""
    cdf = logp.exp().cumsum_(dim=1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)


def predicted_kl(g: torch.Tensor, h: torch.Tensor, dw: torch.Tensor) -> float:
    """0.5 tr(G dW H dW^T): the K-FAC estimate of the per-token KL increase caused by weight error dW [out, in]
    (float32 products, summed in float64 in a fixed order; a bfloat16 G is widened first)."""
    return 0.5 * fixed_order_sum((g.float() @ dw) * (dw @ h))
