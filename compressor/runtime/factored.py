"""Factored linears: W [out, in] replaced by B A, stored as two plain linears `<layer>.lowrank_A` (in -> r) and
`<layer>.lowrank_B` (r -> out, with the layer's bias), so every tool that handles linears (quantization, the
compressed-tensors writer and reader, ONNX) handles the factors as they are.

The artifact records the factored layers and their ranks in config.json under CONFIG_KEY; `compressor.load` builds
the factored modules from it before the weights are read. transformers does not know these modules: it cannot load
such an artifact without custom code (`compress densify` writes the product B A back as a standard checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CONFIG_KEY = "compressor_lowrank"  # config.json: {"format": "lowrank_A/lowrank_B", "layers": {name: rank}}
A_NAME, B_NAME = "lowrank_A", "lowrank_B"


class FactoredLinear(nn.Module):
    """y = B (A x) + b: `lowrank_A` [r, in] without bias, then `lowrank_B` [out, r] with the layer's bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lowrank_A = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.lowrank_B = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    @classmethod
    def of(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> FactoredLinear:
        """The module holding `down` (A [r, in]), `up` (B [out, r]) and `bias` (float32 copies)."""
        rank, in_features = down.shape
        module = cls(in_features, up.shape[0], rank, bias is not None)
        with torch.no_grad():
            module.lowrank_A.weight.copy_(down)
            module.lowrank_B.weight.copy_(up)
            if bias is not None:
                module.lowrank_B.bias.copy_(bias)
        return module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank_B(self.lowrank_A(x))

    def dense_weight(self) -> torch.Tensor:
        """B A as one [out, in] float32 weight."""
        return self.lowrank_B.weight.float() @ self.lowrank_A.weight.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def expand_groups(groups: Sequence[tuple[str, ...]], factored: set[str]) -> list[tuple[str, ...]]:
    """A block's linear groups (names sharing an input, in execution order) with each factored member as its two
    linears: `<name>.lowrank_A` takes its place (it reads the group's input), `<name>.lowrank_B` follows as a group of
    its own (it reads A's output)."""
    out: list[tuple[str, ...]] = []
    for group in groups:
        out.append(tuple(f"{n}.{A_NAME}" if n in factored else n for n in group))
        out += [(f"{n}.{B_NAME}",) for n in group if n in factored]
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build_factored(model: nn.Module, ranks: dict[str, int], dtype: torch.dtype) -> None:
    """Replace each named linear by an (uninitialized) FactoredLinear of its rank, for the weights to be loaded."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        in_features, out_features = _shape(old)
        new = FactoredLinear(in_features, out_features, int(rank), getattr(old, "bias", None) is not None, dtype)
        set_submodule(model, name, new.requires_grad_(False))


def densify(model: nn.Module) -> list[str]:
    """Replace every FactoredLinear by a plain nn.Linear holding B A (and its bias); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
    for name in names:
        f = model.get_submodule(name)
        dense = nn.Linear(f.in_features, f.out_features, bias=f.lowrank_B.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(f.dense_weight())
            if f.lowrank_B.bias is not None:
                dense.bias.copy_(f.lowrank_B.bias.float())
        set_submodule(model, name, dense.requires_grad_(False))
    return names


def _shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear (nn.Linear, or gpt2's Conv1D, whose weight is [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight
    return int(w.shape[0]), int(w.shape[1])
