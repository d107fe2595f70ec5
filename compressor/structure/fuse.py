"""Block fusion: LaCo-style parameter merging of m adjacent blocks, plus an optional closed-form
least-squares correction of the merged block's output projections on calibration activations.

Merging (Layer Collapse, Yang et al. 2024): theta* = theta_l + sum_{k=l+1}^{l+m-1} (theta_k - theta_l), applied
to every linear weight and bias of the block (norms keep block l's values). The merged block approximates
running the m blocks in a row when their residual updates are small and similar.

Correction: with X the merged block's input on calibration tokens and Y the output of the original m blocks,
the attention output projection is refitted so the merged attention branch matches the sum of the original
attention branches, then the MLP output projection so the block output matches Y. Each is a ridge regression
toward the merged weight: (A^T A + lam I) dW^T = A^T (T - A W0^T - b), lam = ridge * mean(diag(A^T A)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.adapters import Adapter
from .runner import BlockRunner, Capture, Hidden


@torch.no_grad()
def laco_merge(adapter: Adapter, blocks: Sequence[nn.Module]) -> None:
    """Merge blocks[1:] into blocks[0] in place: w0 + sum_k (w_k - w0) for every linear weight and bias."""
    first, rest = blocks[0], blocks[1:]
    for name in adapter.linear_names():
        target = first.get_submodule(name)
        for attr in ("weight", "bias"):
            p0 = getattr(target, attr, None)
            if p0 is None:
                continue
            base = p0.detach().clone()
            for other in rest:
                p0.add_(getattr(other.get_submodule(name), attr) - base)


def ridge_update(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||A W^T - T||^2 + lam ||W - w0||^2 given gram = A^T A, cross = A^T T; W is [out, in]."""
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    lhs = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    rhs = cross - gram @ w0.t()
    delta = torch.linalg.solve(lhs, rhs)  # [in, out]
    return w0 + delta.t()


def _fit_projection(
    adapter: Adapter, module: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], ridge: float
) -> None:
    """Refit `module`'s weight (bias kept) so module(inputs) ~ targets."""
    w0 = adapter.get_weight(module).double()
    bias = getattr(module, "bias", None)
    gram = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64)
    cross = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64)
    for a, t in zip(inputs, targets):
        a = a.reshape(-1, a.shape[-1]).double()
        t = t.reshape(-1, t.shape[-1]).double()
        if bias is not None:
            t = t - bias.double()
        gram.addmm_(a.t(), a)
        cross.addmm_(a.t(), t)
    adapter.set_weight(module, ridge_update(gram, cross, w0, ridge).float())


def fuse_window(
    runner: BlockRunner,
    adapter: Adapter,
    start: int,
    size: int,
    hidden: Hidden,
    attention_proj: str | None,
    mlp_proj: str | None,
    ridge: float | None,
) -> None:
    """Merge blocks start..start+size-1 into block `start` (in place); `hidden` is its calibration input.

    With `ridge` (and linear branches) the merged output projections get the least-squares correction.
    The caller deletes the absorbed blocks.
    """
    blocks = [runner.blocks[i] for i in range(start, start + size)]
    correct = ridge is not None and attention_proj is not None and mlp_proj is not None
    attn_target: list[torch.Tensor] | None = None
    target: Hidden | None = None
    if correct:
        caps = [Capture(b.get_submodule(attention_proj), inputs=False) for b in blocks]
        try:
            target = runner.run(start, hidden, stop=start + size)
        finally:
            for c in caps:
                c.remove()
        n_chunks = len(hidden)
        attn_target = [sum(c.outputs[j] for c in caps) for j in range(n_chunks)]
        del caps
    laco_merge(adapter, blocks)
    if not correct:
        return
    merged = blocks[0]
    attn = merged.get_submodule(attention_proj)
    cap = Capture(attn)
    try:
        runner.run_block(start, hidden)
    finally:
        cap.remove()
    _fit_projection(adapter, attn, cap.inputs, attn_target, ridge)
    del cap, attn_target
    mlp = merged.get_submodule(mlp_proj)
    cap = Capture(mlp)
    try:
        out = runner.run_block(start, hidden)
    finally:
        cap.remove()
    # block output = mid + mlp branch; the branch should become target - mid
    mlp_target = [t - (o - b.reshape(o.shape)) for t, o, b in zip(target, out, cap.outputs)]
    _fit_projection(adapter, mlp, cap.inputs, mlp_target, ridge)
