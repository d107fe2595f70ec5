"""Fold a per-channel divisor into the module that produces a linear's input (activation-aware scaling).

A norm absorbs it in its affine weight (and bias); a linear in its output rows (and bias). Float modules only;
an already-quantized predecessor is rescaled by the caller through its quantization scales.
"""

from __future__ import annotations

import torch
from torch import nn

from .families import is_conv1d


def can_fold_into(module: nn.Module) -> bool:
    """Whether `module`'s output can be divided per channel by changing its parameters."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return getattr(module, "weight", None) is not None and module.weight.dim() == 1


@torch.no_grad()
def fold_divisor(module: nn.Module, divisor: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Make `module`'s output equal to its old output / divisor (per output channel).

    A norm that scales by (c + weight) takes `norm_offset` c: the model family's `adapter.norm_offset(module)`."""
    d = divisor.to(torch.float32)
    if isinstance(module, nn.Linear):
        module.weight.copy_((module.weight.float() / d[:, None]).to(module.weight.dtype))
    elif is_conv1d(module):
        module.weight.copy_((module.weight.float() / d[None, :]).to(module.weight.dtype))
    elif norm_offset:
        module.weight.copy_(((norm_offset + module.weight.float()) / d - norm_offset).to(module.weight.dtype))
    else:
        module.weight.copy_((module.weight.float() / d).to(module.weight.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / d).to(bias.dtype))


@torch.no_grad()
def scale_input_columns(module: nn.Module, scale: torch.Tensor) -> None:
    """W -> W diag(scale): the linear now expects inputs divided by `scale`."""
    s = scale.to(torch.float32)
    if is_conv1d(module):  # weight [in, out]
        module.weight.copy_((module.weight.float() * s[:, None]).to(module.weight.dtype))
    else:
        module.weight.copy_((module.weight.float() * s[None, :]).to(module.weight.dtype))
