"""Activation-aware per-input-channel scaling (AWQ, Lin et al. 2023), searched on second-order statistics.

Linears reading the same input x get W -> W diag(s) while x -> x / s (folded into whatever produced x), so the
product is unchanged in float; quantizing W diag(s) protects the input channels with large activations. The scale
is s = mean|x|^alpha (normalised), alpha chosen on a grid to minimise the output error

    E ||(Q(W diag(s)) diag(s)^-1 - W) x||^2 = tr(dW H dW^T),   H = E[x x^T],

which needs only the Gram matrix the calibration engine already gathers, not the activations themselves.
alpha = 0 (no scaling) is on the grid, so the result is never worse than plain quantization on that metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .linalg import output_error

QuantizeFn = Callable[[torch.Tensor], torch.Tensor]  # float weight -> dequantized quantized weight
RunAll = Callable[[list[Callable[[], float]]], list[float]]  # runs jobs, returns their results in order


@dataclass
class AwqResult:
    scale: torch.Tensor  # [in_features]; multiply weight columns, divide inputs
    alpha: float
    error: float  # tr(dW H dW^T) summed over the linears, with the chosen scale
    error_unscaled: float  # the same for alpha = 0


def awq_search(
    weights: Sequence[torch.Tensor],
    quantizers: Sequence[QuantizeFn],
    h: torch.Tensor,
    mean_abs: torch.Tensor,
    grid: int = 20,
    run_all: RunAll | None = None,
) -> AwqResult:
    """The per-channel scale minimising the summed output error of `weights` (each with its own quantizer).

    `run_all` evaluates the grid's jobs (a distributed run shares them out among its workers); default: in turn."""
    x_mag = mean_abs.to(torch.float32).clamp_min(1e-8)
    scales = [_scale(x_mag, i / grid) for i in range(grid)]

    def error_at(s: torch.Tensor) -> float:
        return sum(output_error(quantize(w * s) / s - w, h) for w, quantize in zip(weights, quantizers))

    jobs = [partial(error_at, s) for s in scales]
    errors = run_all(jobs) if run_all is not None else [job() for job in jobs]
    best = min(range(grid), key=lambda i: (errors[i], i))  # the first of equal errors
    return AwqResult(scales[best], best / grid, errors[best], errors[0])


def _scale(x_mag: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean|x|^alpha, normalised to a geometric mean of 1 between its extremes, clamped to [1e-4, 1e4]."""
    s = x_mag.pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(1e-4, 1e4)
