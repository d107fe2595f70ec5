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

import torch

QuantizeFn = Callable[[torch.Tensor], torch.Tensor]  # float weight -> dequantized quantized weight


@dataclass
class AwqResult:
    scale: torch.Tensor  # [in_features]; multiply weight columns, divide inputs
    alpha: float
    error: float  # tr(dW H dW^T) summed over the linears, with the chosen scale
    error_unscaled: float  # the same for alpha = 0


def output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T): expected squared output error of weight error dW [out, in] under input Gram H."""
    return float(((dw @ h) * dw).sum())


def awq_search(
    weights: Sequence[torch.Tensor],
    quantizers: Sequence[QuantizeFn],
    h: torch.Tensor,
    mean_abs: torch.Tensor,
    grid: int = 20,
) -> AwqResult:
    """The per-channel scale minimising the summed output error of `weights` (each with its own quantizer)."""
    x_mag = mean_abs.to(torch.float32).clamp_min(1e-8)
    best: AwqResult | None = None
    unscaled = None
    for i in range(grid):
        alpha = i / grid
        s = x_mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        s = s.clamp(1e-4, 1e4)
        err = 0.0
        for w, quantize in zip(weights, quantizers):
            dw = quantize(w * s) / s - w
            err += output_error(dw, h)
        if i == 0:
            unscaled = err
        if best is None or err < best.error:
            best = AwqResult(s, alpha, err, 0.0)
    best.error_unscaled = unscaled
    return best
