"""Dense linear algebra shared by the solvers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block inside on one torch thread. Two uses: LAPACK factorizations (Cholesky, inverse, eigh, SVD, QR,
    triangular solves), whose results must not depend on how many threads the process has (MKL splits their work by
    thread count and the last bits differ: torch.linalg.cholesky of a 1280-wide Gram matrix, 1.2e-7 apart with 1 and
    2 threads), so 2 processes x 1 thread write the artifact 1 process x 2 threads writes (benchmarks/scale.py; the
    GEMMs around them gave identical results at either thread count and keep every thread); and GPTQ's column
    sweep, thousands of tiny ops where OpenMP hand-offs dominate (a busy 2-core machine: 33 s with 2 threads, 1 s
    with one, for four 192x576 solves)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def damped_cholesky(
    h: torch.Tensor, damp: float, scale: float, attempts: int = 6
) -> Iterator[tuple[torch.Tensor, float]]:
    """Lower Cholesky factors of h + damp * 10^a * scale * I for a = 0 .. attempts-1, each with the damping added
    (damp * 10^a * scale), skipping the dampenings at which the matrix is not (numerically) positive definite: a
    rank-deficient h needs more than `damp`.

    `scale` is the caller's measure of h (its mean diagonal); the damping is computed in Python floats, in this
    order, and added in h's dtype.
    """
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(attempts):
        damping = damp * 10**attempt * scale
        with one_thread():
            factor, info = torch.linalg.cholesky_ex(h + damping * eye)
        if int(info) == 0:
            yield factor, damping


def damped_cholesky_factors(h: torch.Tensor, damp: float, scale: float, attempts: int = 6) -> Iterator[torch.Tensor]:
    """The factors of `damped_cholesky`, without their damping."""
    return (factor for factor, _ in damped_cholesky(h, damp, scale, attempts))


def output_error(e: torch.Tensor, h: torch.Tensor) -> float:
    """tr(E H E^T) in float64 for a weight error E [out, in] and an input Gram matrix H [in, in]: the squared output
    error summed over the outputs and the tokens H gathers (per token when H is their mean)."""
    e = e.to(torch.float64)
    return fixed_order_sum((e @ h.to(torch.float64)) * e)


def fixed_order_sum(t: torch.Tensor) -> float:
    """The sum of `t`'s elements in float64 on one thread: a multi-threaded sum adds in an order that depends on the
    thread count (a float32 sum of 885k elements differed in its last bits between 1 and 2 threads), and the
    choices made from these sums (allocations, scales) must not."""
    with one_thread():
        return float(t.to(torch.float64).sum())
