"""Dense linear algebra shared by the solvers."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def damped_cholesky_factors(h: torch.Tensor, damp: float, scale: float, attempts: int = 6) -> Iterator[torch.Tensor]:
    """Lower Cholesky factors of h + damp * 10^a * scale * I for a = 0 .. attempts-1, skipping the dampenings at
    which the matrix is not (numerically) positive definite: a rank-deficient h needs more than `damp`.

    `scale` is the caller's measure of h (its mean diagonal); the damping is computed in Python floats, in this
    order, and added in h's dtype.
    """
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(attempts):
        factor, info = torch.linalg.cholesky_ex(h + damp * 10**attempt * scale * eye)
        if int(info) == 0:
            yield factor
