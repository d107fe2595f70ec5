"""Device moves of modules that keep their weights in a storage dtype of their own."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def apply_to_buffers_device_only(
    module: nn.Module, base_apply: Callable[..., nn.Module], fn: Callable, recurse: bool
) -> nn.Module:
    """`module._apply(fn)` (`.to()`, `.cuda()`, `.half()`, ...) through `base_apply` (nn.Module._apply bound to it)
    with its buffers set aside: its parameters (a bias) convert as usual, while each buffer only moves to the
    device `fn` sends a tensor like it to, keeping its dtype (casting would change a format or round values)."""
    kept, module._buffers = module._buffers, {}
    try:
        out = base_apply(fn, recurse)
    finally:
        module._buffers = kept
    for name, t in kept.items():
        if t is not None:
            kept[name] = t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)
    return out
