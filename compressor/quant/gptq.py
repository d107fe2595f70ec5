"""GPTQ (Frantar et al. 2022): column-by-column quantization with second-order error feedback.

Statistics (the input Gram matrix H = sum x x^T) are gathered elsewhere; this module only solves.
Rows are independent given H, so linears that share an input (q/k/v, gate/up) are solved as one matrix.
"""

from __future__ import annotations

import contextlib

import torch

from .formats import IntFormat
from .rtn import expand_groups, find_qparams


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising dampening until it is positive definite."""
    k = h.shape[0]
    diag_mean = torch.mean(torch.diag(h)).item()
    eye = torch.eye(k, dtype=h.dtype)
    for attempt in range(6):
        lam = damp * (10**attempt) * max(diag_mean, 1e-8)
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return chol_inv
    raise RuntimeError("GPTQ: Hessian is not positive definite even after raising dampening")


@contextlib.contextmanager
def _one_thread():
    """The column sweep is thousands of tiny ops: one thread avoids OpenMP hand-offs that dominate them (measured
    on a busy 2-core machine: 33 s with 2 threads vs 1 s with one for four 192x576 solves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize w [N, K] given the input Gram matrix h [K, K].

    Returns (codes int8 [N, K], scale [N, G], zero [N, G] or None) in the original column order, with
    contiguous groups along K (the last may be ragged). `act_order` processes columns by decreasing
    diag(H) and therefore uses static groups (scales fixed from the unquantized weight), so no g_idx
    permutation has to be stored.
    """
    w = w.to(torch.float32).clone()
    h = h.to(torch.float32).clone()
    n, k = w.shape
    group = fmt.effective_group(k)
    grouped = fmt.group_size is not None
    static = static_groups or act_order or not grouped

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    n_groups = fmt.num_groups(k)
    scale = torch.empty(n, n_groups)
    zero = None if fmt.symmetric else torch.empty(n, n_groups)
    if static:
        s, z = find_qparams(w, fmt, scale_dtype, clip_search)
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    group_of = perm // group  # group index (original order) of each processed column
    hinv = _inverse_hessian_cholesky(h, damp)

    codes = torch.empty(n, k, dtype=torch.int8)
    with _one_thread():
        _sweep_columns(w, hinv, codes, scale, zero, group_of, fmt, group, static, block_size, scale_dtype, clip_search)
    inv = torch.argsort(perm)
    return codes[:, inv].contiguous(), scale, zero


def _sweep_columns(w, hinv, codes, scale, zero, group_of, fmt, group, static, block_size, scale_dtype, clip_search):
    n, k = w.shape
    qmin, qmax = fmt.qmin, fmt.qmax
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not static and col % group == 0:
                cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                s, z = find_qparams(cols, IntFormat(fmt.bits, None, fmt.symmetric), scale_dtype, clip_search)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            s_col = scale[:, g]
            wc = w1[:, i]
            q = torch.round(wc / s_col)
            if zero is not None:
                q = q + zero[:, g]
            q = torch.clamp(q, qmin, qmax)
            codes[:, col] = q.to(torch.int8)
            dq = (q - zero[:, g]) * s_col if zero is not None else q * s_col
            e = (wc - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


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
    per column and its own code range, so one column sweep serves every candidate. Equal to `gptq_quantize`
    with static groups for each format (dequantized).
    """
    w = w.to(torch.float32)
    h = h.to(torch.float32).clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w = w.clone()
    w[:, dead] = 0.0
    scales, zeros, lo, hi = [], [], [], []
    for fmt in fmts:
        s, z = find_qparams(w, fmt, scale_dtype, clip_search)
        g = fmt.effective_group(k)
        scales.append(expand_groups(s, k, g))
        zeros.append(torch.zeros(n, k) if z is None else expand_groups(z, k, g))
        lo.append(torch.full((n,), float(fmt.qmin)))
        hi.append(torch.full((n,), float(fmt.qmax)))
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    # column-major copies ([K, rows]): the sweep reads and writes whole columns, contiguous this way
    stacked_t = torch.cat([w] * len(fmts)).t()[perm].contiguous()
    scale_t, zero_t = torch.cat(scales).t()[perm].contiguous(), torch.cat(zeros).t()[perm].contiguous()
    qmin, qmax = torch.cat(lo), torch.cat(hi)
    hinv = _inverse_hessian_cholesky(h[perm][:, perm], damp)
    out_t = torch.empty_like(stacked_t)
    with _one_thread():
        _sweep_stacked(stacked_t, hinv, scale_t, zero_t, qmin, qmax, out_t, block_size)
    out = out_t[torch.argsort(perm)].t()
    return [part.contiguous() for part in out.split(n)]


def _sweep_stacked(wt, hinv, scale_t, zero_t, qmin, qmax, out_t, block_size, inner: int = 32) -> None:
    """The column sweep on transposed matrices (wt, scale_t, zero_t, out_t: [K, rows], column c = row c), blocked
    twice: rank-1 updates only inside `inner`-column sub-blocks, the rest of the block and of the matrix updated by
    products (mathematically the same updates as one rank-1 update per column over the whole block, in a quarter
    of the elementwise work at block 128; only the float rounding differs)."""
    k = wt.shape[0]
    q = torch.empty(wt.shape[1])
    e = torch.empty_like(q)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                s_col, z_col, dq = scale_t[col], zero_t[col], out_t[col]
                torch.div(w1[i], s_col, out=q).round_().add_(z_col)
                torch.clamp(q, qmin, qmax, out=q)
                torch.mul(q.sub_(z_col), s_col, out=dq)
                torch.sub(w1[i], dq, out=e).div_(hinv1[i, i])
                w1[i:j2].addr_(hinv1[i, i:j2], e, alpha=-1.0)
                err1[i] = e
            if j2 < i2 - i1:
                w1[j2:].addmm_(hinv1[j1:j2, j2:].t(), err1[j1:j2], alpha=-1.0)
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
