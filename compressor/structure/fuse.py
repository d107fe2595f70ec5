"""Block fusion: replace m adjacent blocks by one block of the same shapes, fitted to their output.

Starting points. LaCo parameter merging (Layer Collapse, Yang et al. 2024): theta* = theta_l +
sum_{k=l+1}^{l+m-1} (theta_k - theta_l) on every linear weight and bias (norms keep block l's values). For a
pair this is exactly theta_{l+1}'s linears under block l's norms, i.e. a drop of block l with mismatched norms,
so it is a poor point to correct from. The other starting points are the window's own blocks, each whole
(norms included): "keep block k, drop the rest of the window".

Correction (`ridge` given). With X the window's input on calibration tokens, Y the output of the original m
blocks on X and A the sum of their attention-branch outputs, each starting point is refitted in closed form:
the attention output projection so the merged attention branch matches A, then (on the new attention output)
the MLP output projection so the block output matches Y. Both are linear least squares with everything else
in the block fixed, solved as a ridge regression toward the starting weight,
(F^T F + lam I) dW^T = F^T (T - F W0^T - b), lam = r * mean(diag(F^T F)).
- Every token's squared error is divided by its target's mean square: the next block and the final norm see a
  hidden state only after RMS/LayerNorm, so what matters is the error relative to the token's norm (without
  this the few tokens with massive activations dominate the fit).
- Every 4th calibration window is held out. r is chosen per projection from a grid by the held-out error
  (closed form: the error of any W is quadratic in W given the held-out normal equations), r = inf (keep
  the starting weight) included; `ridge` as a number fixes r instead. The starting point whose corrected
  block has the lowest held-out error wins and is refitted on all windows with its chosen r.
What is approximated: the fit is local (one window's output, not the model's loss) and made on the input the
caller passes (`ops.fuse_blocks` merges top-down, so that is the base model's input: merges below a window
change it afterwards); only the two output projections are refitted (queries, keys, values, gate/up and
norms keep the starting point's values, since the block is nonlinear in them); biases are kept. Without
`ridge` the window is LaCo-merged as is.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.ranks import ONE_PROCESS, Ranks
from ..models.adapters import Adapter
from ..quant.linalg import one_thread
from .runner import BlockRunner, Capture, Hidden

log = logging.getLogger(__name__)

HOLDOUT_EVERY = 4  # every 4th calibration window is held out to choose r and the starting point
RIDGE_GRID = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, math.inf)  # r: lam = r * mean diag(F^T F)
RIDGE_FALLBACK = 1e-2  # r when too few windows to hold any out


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


@dataclass
class Normal:
    """Weighted normal equations of one projection refit: F^T F, F^T T and T^T T (trace), float64."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: float

    def error(self, w: torch.Tensor) -> float:
        """||F W^T - T||^2 for a [out, in] weight."""
        return ((w @ self.gram) * w).sum().item() - 2 * (w * self.cross.t()).sum().item() + self.energy

    def __add__(self, other: Normal) -> Normal:
        return Normal(self.gram + other.gram, self.cross + other.cross, self.energy + other.energy)

    def merged(self, ranks: Ranks) -> Normal:
        """The sum over the processes' windows (each process holds its windows' sums), rounded to float32 values
        (kept in float64): the sums are of float32 chunk products, so the rounded result does not depend on how
        the chunks were split among processes."""
        d, o = self.cross.shape
        flat = torch.cat(
            [self.gram.reshape(-1), self.cross.reshape(-1), torch.tensor([self.energy], dtype=torch.float64)]
        )
        flat = ranks.sum_in_rank_order(flat).float().double()
        return Normal(flat[: d * d].reshape(d, d), flat[d * d : d * d + d * o].reshape(d, o), flat[-1].item())


def normal_equations(
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    held: list,
    d: int,
    o: int,
) -> tuple[Normal, Normal]:
    """(fit, held-out) normal equations of `d` features onto `o` targets; per chunk, `held[c]` marks the held-out
    windows (rows). No chunks: zero sums."""
    parts = [Normal(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, o, dtype=torch.float64), 0.0)]
    parts.append(copy.deepcopy(parts[0]))
    for a, t, w, h in zip(inputs, targets, weights, held):
        rows = h.shape[0]  # some families call their projections on [tokens, width]
        a, t, s = a.reshape(rows, -1, d), t.reshape(rows, -1, o), w.sqrt().reshape(rows, -1, 1)
        for part, rows in zip(parts, (~h, h)):
            if not rows.any():
                continue
            fa = (a[rows].float() * s[rows]).reshape(-1, d)
            ft = (t[rows].float() * s[rows]).reshape(-1, o)
            part.gram += (fa.t() @ fa).double()
            part.cross += (fa.t() @ ft).double()
            part.energy += ft.double().pow(2).sum().item()
    return parts[0], parts[1]


def solve_ridge(normal: Normal, w0: torch.Tensor, grid: Sequence[float]) -> list[torch.Tensor]:
    """Ridge solutions toward w0 ([out, in], float64) for every r in grid (inf: w0 itself)."""
    with one_thread():
        evals, evecs = torch.linalg.eigh(normal.gram)
    rot = evecs.t() @ (normal.cross - normal.gram @ w0.t())  # [in, out] in the eigenbasis
    scale = normal.gram.diagonal().mean().clamp_min(1e-30)
    out = []
    for r in grid:
        if math.isinf(r):
            out.append(w0.clone())
            continue
        delta = evecs @ (rot / (evals.clamp_min(0) + r * scale).unsqueeze(1))
        out.append(w0 + delta.t())
    return out


def held_rows(hidden: Hidden, first: int = 0, total: int | None = None) -> list[torch.Tensor]:
    """Per chunk, a bool per window: every HOLDOUT_EVERY-th window of all `total` windows is held out (with 2..3
    windows, the last one; with a single window none). `hidden` holds windows first..first+len-1 of them (a
    process's share)."""
    total = sum(h.shape[0] for h in hidden) if total is None else total
    every = max(1, min(HOLDOUT_EVERY, total))
    out, seen = [], first
    for h in hidden:
        idx = torch.arange(seen, seen + h.shape[0])
        out.append((idx % every == every - 1) & (total >= 2))
        seen += h.shape[0]
    return out


def token_weights(target: Hidden) -> Hidden:
    """1 / mean square of each target token ([rows, seq, 1]): the squared error relative to the token's norm."""
    return [1.0 / t.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12) for t in target]


def starting_points(adapter: Adapter, blocks: Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """LaCo's merge and each block of the window whole, as copies of blocks[0] (its module attributes)."""
    laco = copy.deepcopy(blocks[0])
    laco_merge(adapter, [laco, *blocks[1:]])
    points = [("laco", laco)]
    for k, block in enumerate(blocks):
        own = copy.deepcopy(blocks[0])
        own.load_state_dict(block.state_dict())
        points.append((f"keep{k}", own))
    return points


def _run_captured(runner: BlockRunner, start: int, hidden: Hidden, block: nn.Module, name: str):
    cap = Capture(block.get_submodule(name))
    try:
        out = runner.run_block(start, hidden, block)
    finally:
        cap.remove()
    return out, cap


@dataclass
class Share:
    """A process's part of the calibration windows: the windows first..first+n-1 of `total` (None: all of them
    are here)."""

    ranks: Ranks
    first: int
    total: int | None


@dataclass
class Trial:
    """One corrected starting point: its starting weights, held-out error and chosen r per projection."""

    name: str
    state: dict[str, torch.Tensor]
    error: float
    ridge: tuple[float, float]
    attention: Normal  # normal equations of the attention projection on every window (reused by `finish`)


class WindowFit:
    """The correction of one window (module docstring): targets from the original blocks, then `search` per
    starting point and `finish` for the best one."""

    def __init__(self, runner, adapter, start, hidden, blocks, attention_proj, mlp_proj, ridge, share: Share):
        self.runner, self.adapter, self.start, self.hidden = runner, adapter, start, hidden
        self.attention_proj, self.mlp_proj, self.ridge, self.ranks = attention_proj, mlp_proj, ridge, share.ranks
        caps = [Capture(b.get_submodule(attention_proj), inputs=False) for b in blocks]
        try:
            self.target = runner.run(start, hidden, stop=start + len(blocks))
        finally:
            for c in caps:
                c.remove()
        self.attn_target = [sum(c.outputs[j] for c in caps) for j in range(len(hidden))]
        self.weights = token_weights(self.target)
        self.held = held_rows(hidden, share.first, share.total)

    def _normals(self, module: nn.Module, inputs: Hidden, targets: Hidden) -> tuple[Normal, Normal]:
        o, d = self.adapter.get_weight(module).shape
        bias = getattr(module, "bias", None)
        if bias is not None:
            targets = [t - bias.to(t.dtype).reshape(-1) for t in targets]
        fit, val = normal_equations(inputs, targets, self.weights, self.held, d, o)
        return fit.merged(self.ranks), val.merged(self.ranks)

    def _choose(self, module: nn.Module, fit: Normal, val: Normal) -> tuple[float, float]:
        """Set the fit-window solution with the r of lowest held-out error; returns (r, error). Without
        held-out windows: r = `ridge` (or the fallback) and the error on the fit windows."""
        w0 = self.adapter.get_weight(module).double()
        if val.energy == 0:
            r = RIDGE_FALLBACK if self.ridge == "auto" else float(self.ridge)
            w = solve_ridge(fit, w0, (r,))[0]
            self.adapter.set_weight(module, w.float())
            return r, fit.error(w)
        grid = RIDGE_GRID if self.ridge == "auto" else (float(self.ridge),)
        err, r, w = min(((val.error(w), r, w) for r, w in zip(grid, solve_ridge(fit, w0, grid))), key=lambda e: e[0])
        self.adapter.set_weight(module, w.float())
        return r, err

    def _mlp_normals(self, block: nn.Module) -> tuple[Normal, Normal]:
        mlp = block.get_submodule(self.mlp_proj)
        out, cap = _run_captured(self.runner, self.start, self.hidden, block, self.mlp_proj)
        # block output = mid + mlp branch; the branch should become target - mid
        mid = [o - b.reshape(o.shape) for o, b in zip(out, cap.outputs)]
        return self._normals(mlp, cap.inputs, [t - m.reshape(t.shape) for t, m in zip(self.target, mid)])

    def search(self, name: str, block: nn.Module) -> Trial:
        """Correct `block` (a starting point, modified in place) on the fit windows."""
        state = {k: v.clone() for k, v in block.state_dict().items()}
        attn = block.get_submodule(self.attention_proj)
        _, cap = _run_captured(self.runner, self.start, self.hidden, block, self.attention_proj)
        fit, val = self._normals(attn, cap.inputs, self.attn_target)
        del cap
        r_attn, _ = self._choose(attn, fit, val)
        r_mlp, err = self._choose(block.get_submodule(self.mlp_proj), *self._mlp_normals(block))
        return Trial(name, state, err, (r_attn, r_mlp), fit + val)

    def finish(self, block: nn.Module, trial: Trial) -> None:
        """Give `block` the trial's starting weights, corrected on every window with the trial's r."""
        block.load_state_dict(trial.state)
        # the attention projection's inputs do not depend on it: reuse the search's normal equations
        attn = block.get_submodule(self.attention_proj)
        w0 = self.adapter.get_weight(attn).double()
        self.adapter.set_weight(attn, solve_ridge(trial.attention, w0, (trial.ridge[0],))[0].float())
        mlp = block.get_submodule(self.mlp_proj)
        fit, val = self._mlp_normals(block)  # the MLP projection's inputs follow the new attention output
        w0 = self.adapter.get_weight(mlp).double()
        self.adapter.set_weight(mlp, solve_ridge(fit + val, w0, (trial.ridge[1],))[0].float())


def fuse_window(
    runner: BlockRunner,
    adapter: Adapter,
    start: int,
    size: int,
    hidden: Hidden,
    attention_proj: str | None,
    mlp_proj: str | None,
    ridge: float | str | None,
    share: Share | None = None,
) -> dict:
    """Replace blocks start..start+size-1 by one block in slot `start` (in place); `hidden` is its calibration
    input (`share`: which of the calibration windows this process holds; the fit's sums are merged over the
    processes). With `ridge` (a number, or 'auto') and linear branches, every starting point is corrected and the
    best on the held-out windows is kept; otherwise LaCo's merge is kept. The caller deletes the absorbed
    blocks. Returns what was chosen."""
    blocks = [runner.blocks[i] for i in range(start, start + size)]
    if ridge is None or attention_proj is None or mlp_proj is None:
        laco_merge(adapter, blocks)
        return {"start": start, "from": "laco"}
    share = share or Share(ONE_PROCESS, 0, None)
    fit = WindowFit(runner, adapter, start, hidden, blocks, attention_proj, mlp_proj, ridge, share)
    trials = [fit.search(name, block) for name, block in starting_points(adapter, blocks)]
    best = min(trials, key=lambda t: t.error)
    fit.finish(blocks[0], best)
    log.debug("fuse: window %d..%d from %s, r %s", start, start + size - 1, best.name, best.ridge)
    return {"start": start, "from": best.name, "ridge": list(best.ridge), "error": best.error}
