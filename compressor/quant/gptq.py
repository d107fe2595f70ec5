"""GPTQ (Frantar et al. 2022): column-by-column quantization with second-order error feedback.

Statistics (the input Gram matrix H = sum x x^T) are gathered elsewhere; this module only solves.
Rows are independent given H, so linears that share an input (q/k/v, gate/up) are solved as one matrix, and so are
the candidate formats of one weight (`gptq_dequantized_many`): both entry points run the same column sweep (`_Sweep`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .formats import IntFormat
from .linalg import damped_cholesky, one_thread
from .rtn import expand_groups, find_qparams

QParams = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class SweepStats:
    """What one `gptq_quantize` solve did beside its result (filled in when passed one): the damping added to H's
    diagonal, and per row the number of weights clamped to the grid's ends (their value, error feedback included,
    rounded to a code outside the grid)."""

    damping: float = 0.0
    clamped: torch.Tensor | None = None  # [rows] int64


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising dampening until it is positive definite; and
    the damping added."""
    diag_mean = torch.mean(torch.diag(h)).item()
    for chol, damping in damped_cholesky(h, damp, max(diag_mean, 1e-8)):
        with one_thread():
            chol_inv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if info.item() == 0:
            return chol_inv, damping
    raise RuntimeError("GPTQ: Hessian is not positive definite even after raising dampening")


def _prepared(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of w [N, K] and h [K, K] with the dead inputs (diag H = 0) taken out: weight 0, H diagonal 1."""
    w = w.to(torch.float32).clone()
    h = h.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def _order(h: torch.Tensor, damp: float, act_order: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The order the columns are processed in (decreasing diag H with act_order), the upper Cholesky factor of
    the inverse of the so permuted (dampened) H, and the damping."""
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0])
    return perm, *_inverse_hessian_cholesky(h[perm][:, perm], damp)


@dataclass
class _Grid:
    """The quantization grid of every processed column: scale and zero point rows [groups, rows] (zero None:
    symmetric), the row each processed column uses, and the code range (numbers, or per-row tensors).

    With `refit` the grid is dynamic: at each `group`-th column the group's row is fitted to the group's current
    (error-updated) weights, the clip search weighting their columns by `col_weight` (dynamic groups come only
    without act-order, so processed and original column orders agree)."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    group_of: list[int]
    lo: float | torch.Tensor
    hi: float | torch.Tensor
    refit: Callable[..., QParams] | None = None
    group: int = 0
    col_weight: torch.Tensor | None = None

    def refits(self, col: int) -> bool:
        return self.refit is not None and col % self.group == 0

    def fit(self, col: int, current: torch.Tensor) -> None:
        """Refit the row of column `col` to the current weights [rows, <= group] of its group."""
        weight = None if self.col_weight is None else self.col_weight[col : col + current.shape[1]]
        s, z = self.refit(current, col_weight=weight)
        g = self.group_of[col]
        self.scale[g] = s[:, 0]
        if self.zero is not None:
            self.zero[g] = z[:, 0]

    def at(self, col: int) -> QParams:
        g = self.group_of[col]
        return self.scale[g], None if self.zero is None else self.zero[g]


def _quantize_column(
    wc: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
    q: torch.Tensor,
    dq: torch.Tensor,
    clamped: torch.Tensor | None = None,
) -> None:
    """Codes q = clamp(round(wc / s) + z, lo, hi) and dequantized values dq = (q - z) * s of one column, in place;
    `clamped` (per row) counts the codes the clamp moved."""
    torch.div(wc, s, out=q).round_()
    if z is not None:
        q.add_(z)
    if clamped is not None:
        clamped += (q < lo) | (q > hi)
    q.clamp_(lo, hi)
    if z is None:
        torch.mul(q, s, out=dq)
    else:
        torch.sub(q, z, out=dq).mul_(s)


class _Sweep:
    """GPTQ's column sweep: the columns of w [rows, K] (float32, processing order) are quantized one by one on a
    `_Grid`, each column's error fed to the later columns through hinv (upper Cholesky factor of H^-1). Codes go to
    `codes` (int8) and dequantized values to `deq` (float32), both [K, rows] and optional; `clamped` [rows] (optional)
    counts each row's clamped codes.

    Blocks of `block_size` columns are swept on a column-major copy (a column is contiguous); a block's error reaches
    the columns after it by one product. Inside a block the rank-1 updates span `inner`-column sub-blocks (None: the
    whole block) and one product per sub-block carries its error to the rest of the block: the same updates
    mathematically, in a quarter of the elementwise work at block 128 and inner 32, but not the same rounding.
    With `inner` None the updates are those of the textbook loop (a rounded product, then a subtraction).
    """

    def __init__(
        self,
        hinv: torch.Tensor,
        grid: _Grid,
        codes: torch.Tensor | None,
        deq: torch.Tensor | None,
        block_size: int,
        inner: int | None = None,
        clamped: torch.Tensor | None = None,
    ):
        self.hinv, self.grid, self.codes, self.deq = hinv, grid, codes, deq
        self.block_size, self.inner, self.clamped = block_size, inner, clamped

    def run(self, w: torch.Tensor) -> None:
        """Sweep w (updated in place)."""
        rows, k = w.shape
        b = min(self.block_size, k)
        self._buffers(rows, b)
        # the textbook loop rounds the block-to-rest product before subtracting it (one buffer, reused); the
        # sub-blocked sweep (many stacked candidate rows) updates in place, with no [rows, K] temporary
        product = torch.empty(rows * (k - b)) if self.inner is None else None
        for i1 in range(0, k, self.block_size):
            i2 = min(i1 + self.block_size, k)
            err1 = self._block(w, i1, i2)
            if i2 >= k:
                continue
            if product is None:
                w[:, i2:].addmm_(self._row_major(err1.t()), self.hinv[i1:i2, i2:], alpha=-1.0)
            else:
                out = product[: rows * (k - i2)].view(rows, -1)
                w[:, i2:] -= torch.mm(self._row_major(err1.t()), self.hinv[i1:i2, i2:], out=out)

    def _buffers(self, rows: int, b: int) -> None:
        """Work buffers, made once (fresh multi-MB tensors for every block would cost page faults)."""
        self._q, self._dq = torch.empty(rows), torch.empty(rows)
        self._outer = torch.empty(min(self.inner or b, b), rows)
        self._rows, self._w1, self._err1 = torch.empty(rows * b), torch.empty(b, rows), torch.empty(b, rows)

    def _row_major(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of the [rows, width] tensor t, in the staging buffer."""
        return self._rows[: t.numel()].view(t.shape).copy_(t)

    def _block(self, w: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        """Sweep columns i1..i2-1 of w; returns their scaled errors [i2 - i1, rows]."""
        width = i2 - i1
        w1 = self._w1[:width].copy_(self._row_major(w[:, i1:i2]).t())  # (via a contiguous copy: a faster transpose)
        err1 = self._err1[:width]
        hinv1 = self.hinv[i1:i2, i1:i2]
        step = self.inner or width
        for j1 in range(0, width, step):
            j2 = min(j1 + step, width)
            for i in range(j1, j2):
                if self.grid.refits(i1 + i):
                    self.grid.fit(i1 + i, self._group_weights(w1, err1, w, i1, i, i2))
                self._column(w1, err1, hinv1, i, j2, i1 + i)
            if j2 < width:
                w1[j2:].addmm_(hinv1[j1:j2, j2:].t(), err1[j1:j2], alpha=-1.0)
        return err1

    def _group_weights(
        self, w1: torch.Tensor, err1: torch.Tensor, w: torch.Tensor, i1: int, i: int, i2: int
    ) -> torch.Tensor:
        """The current weights [rows, <= group] of the group starting at block column i: the error of every earlier
        column fed back, so columns past the block get the block's pending update (err1[:i] through hinv)."""
        inside = w1[i : i + self.grid.group].t()
        rest = self.grid.group - inside.shape[1]
        if rest == 0 or i2 >= w.shape[1]:
            return inside
        pending = torch.mm(self._row_major(err1[:i].t()), self.hinv[i1 : i1 + i, i2 : i2 + rest])
        return torch.cat([inside, w[:, i2 : i2 + rest] - pending], dim=1)

    def _column(self, w1: torch.Tensor, err1: torch.Tensor, hinv1: torch.Tensor, i: int, j2: int, col: int) -> None:
        """Quantize block column i (matrix column `col`) and spread its error over block columns i..j2-1."""
        s, z = self.grid.at(col)
        q, dq = self._q, self._dq if self.deq is None else self.deq[col]
        _quantize_column(w1[i], s, z, self.grid.lo, self.grid.hi, q, dq, self.clamped)
        if self.codes is not None:
            self.codes[col].copy_(q)
        e = torch.sub(w1[i], dq, out=err1[i]).div_(hinv1[i, i])
        if self.inner is not None:  # the sub-blocked sweep: one fused rank-1 update
            w1[i:j2].addr_(hinv1[i, i:j2], e, alpha=-1.0)
            return
        outer = torch.mul(hinv1[i, i:j2].unsqueeze(1), e, out=self._outer[: j2 - i])  # textbook: rounded, then
        w1[i:j2].sub_(outer)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: IntFormat,
    *,
    scale_dtype: str = "float32",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    stats: SweepStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize w [N, K] given the input Gram matrix h [K, K].

    Returns (codes int8 [N, K], scale [N, G], zero [N, G] or None) in the original column order, with
    contiguous groups along K (the last may be ragged). `act_order` processes columns by decreasing
    diag(H) and therefore uses static groups (scales fixed from the unquantized weight), so no g_idx
    permutation has to be stored. Dynamic groups are fitted when the sweep reaches their first column, to the
    weights as they are then (every earlier column's error fed back). `stats`, if given, is filled in.

    The published algorithm (IST-DASLab/gptq), bit for bit given our scale rule; tests/test_gptq_reference.py
    compares the two and lists where ours differs on purpose.
    """
    w, h = _prepared(w, h)
    n, k = w.shape
    perm, hinv, damping = _order(h, damp, act_order)
    static = static_groups or act_order or fmt.group_size is None
    grid = _format_grid(w, fmt, perm, static, scale_dtype, clip_search, _clip_weight(h, clip_search))
    codes = torch.empty(k, n, dtype=torch.int8)
    clamped = None if stats is None else torch.zeros(n, dtype=torch.int64)
    with one_thread():  # thousands of tiny ops: OpenMP hand-offs would dominate them
        _Sweep(hinv, grid, codes, None, block_size, clamped=clamped).run(w[:, perm])
    if stats is not None:
        stats.damping, stats.clamped = damping, clamped
    zero = None if grid.zero is None else grid.zero.t().contiguous()
    return codes[torch.argsort(perm)].t().contiguous(), grid.scale.t().contiguous(), zero


def rtn_clamped(
    w: torch.Tensor, fmt: IntFormat, scale_dtype: str = "float32", clip_search: bool = False
) -> torch.Tensor:
    """Per row of w [N, K], the weights round-to-nearest clamps to the grid's ends (`SweepStats.clamped` without
    error feedback). Symmetric grids clamp the weights opposite their group's extreme that are more than
    qmax + 1/2 steps from 0 (the extreme itself is exactly qmin steps)."""
    w = w.to(torch.float32)
    scale, zero = find_qparams(w, fmt, scale_dtype, clip_search)
    k, g = w.shape[1], fmt.effective_group(w.shape[1])
    q = torch.round(w / expand_groups(scale, k, g))
    if zero is not None:
        q += expand_groups(zero, k, g)
    return ((q < fmt.qmin) | (q > fmt.qmax)).sum(1)


def _clip_weight(h: torch.Tensor, clip_search: bool) -> torch.Tensor | None:
    """The clip search's column weights: diag(H), so a group's range is chosen for the output error its rounding
    causes (the diagonal part of tr(dW H dW^T)) rather than the weights' own; measured on SmolLM2 W4 g64 (64
    wikitext windows): +16.2% perplexity over base against +18.1% unweighted and +21.5% without clipping."""
    return torch.diag(h).clone() if clip_search else None


def _format_grid(
    w: torch.Tensor,
    fmt: IntFormat,
    perm: torch.Tensor,
    static: bool,
    scale_dtype: str,
    clip_search: bool,
    col_weight: torch.Tensor | None = None,
) -> _Grid:
    """The grid of one format: scales fitted to w now (static), or one row per group fitted during the sweep."""
    n, k = w.shape
    group_of = (perm // fmt.effective_group(k)).tolist()
    if static:
        s, z = find_qparams(w, fmt, scale_dtype, clip_search, col_weight=col_weight)
        return _Grid(s.t().contiguous(), None if z is None else z.t().contiguous(), group_of, fmt.qmin, fmt.qmax)
    g = fmt.num_groups(k)
    zero = None if fmt.symmetric else torch.empty(g, n)
    channel = IntFormat(fmt.bits, None, fmt.symmetric)
    refit = functools.partial(find_qparams, fmt=channel, scale_dtype=scale_dtype, clip_search=clip_search)
    return _Grid(torch.empty(g, n), zero, group_of, fmt.qmin, fmt.qmax, refit, fmt.group_size, col_weight)


def gptq_dequantized_many(
    w: torch.Tensor,
    h: torch.Tensor,
    fmts: list[IntFormat],
    *,
    scale_dtype: str = "float32",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
) -> list[torch.Tensor]:
    """GPTQ of one weight into several formats at once (static scales), returned dequantized [N, K] each.

    The formats' copies of w are stacked as rows (rows are independent given H), each row with its own scale
    per column and its own code range, so one column sweep serves every candidate. The same sweep as
    `gptq_quantize` with static groups, with the rank-1 updates in 32-column sub-blocks: equal up to float
    rounding in the error feedback (which can move a rare code by one step).
    """
    w, h = _prepared(w, h)
    n, k = w.shape
    perm, hinv, _ = _order(h, damp, act_order)
    grid = _stacked_grid(w, fmts, perm, scale_dtype, clip_search, _clip_weight(h, clip_search))
    deq = torch.empty(k, n * len(fmts))
    with one_thread():
        _Sweep(hinv, grid, None, deq, block_size, inner=32).run(torch.cat([w] * len(fmts))[:, perm])
    out = deq[torch.argsort(perm)].t()
    return [part.contiguous() for part in out.split(n)]


def _stacked_grid(
    w: torch.Tensor,
    fmts: list[IntFormat],
    perm: torch.Tensor,
    scale_dtype: str,
    clip_search: bool,
    col_weight: torch.Tensor | None = None,
) -> _Grid:
    """One static grid for w stacked once per format: a scale row per processed column (each format's groups
    expanded), zero points (0 on symmetric formats' rows; None if every format is symmetric), per-row code ranges."""
    n, k = w.shape
    scales, zeros = [], []
    for fmt in fmts:
        s, z = find_qparams(w, fmt, scale_dtype, clip_search, col_weight=col_weight)
        g = fmt.effective_group(k)
        scales.append(expand_groups(s, k, g))
        zeros.append(torch.zeros(n, k) if z is None else expand_groups(z, k, g))
    zero = None if all(f.symmetric for f in fmts) else torch.cat(zeros).t()[perm].contiguous()
    lo = torch.cat([torch.full((n,), float(f.qmin)) for f in fmts])
    hi = torch.cat([torch.full((n,), float(f.qmax)) for f in fmts])
    return _Grid(torch.cat(scales).t()[perm].contiguous(), zero, list(range(k)), lo, hi)
