"""Model surgery: delete blocks, skip sublayers, keep config, layer indices (KV cache) and ties consistent.

Everything here mutates a loaded transformers model in place and leaves a standard architecture behind, so
`save_pretrained` / `from_pretrained` and `generate()` keep working without custom code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import RecipeError
from ..models.adapters import Adapter
from .family import branch_module, check_block_surgery


def depth(adapter: Adapter, model: nn.Module) -> int:
    return len(adapter.blocks(model))


def validate_removal(n_blocks: int, indices: Iterable[int], where: str = "passes") -> list[int]:
    """Sorted unique indices, or a RecipeError when they are out of range or would leave no block."""
    idx = sorted(set(int(i) for i in indices))
    bad = [i for i in idx if not 0 <= i < n_blocks]
    if bad:
        raise RecipeError(
            f"block indices {bad} do not exist (the model has {n_blocks} blocks, 0..{n_blocks - 1})",
            where=where,
            fix="name existing blocks",
        )
    if len(idx) >= n_blocks:
        raise RecipeError(
            f"removing {len(idx)} of {n_blocks} blocks would leave none",
            where=where,
            fix=f"remove at most {n_blocks - 1} blocks",
        )
    return idx


def _set_num_layers(config, n: int) -> None:
    config.num_hidden_layers = n  # gpt2's n_layer is an alias (attribute_map)
    for key in ("n_layer", "num_layers"):
        if key in getattr(config, "attribute_map", {}):
            continue
        if hasattr(config, key) and isinstance(getattr(config, key), int):
            setattr(config, key, n)


def reindex_layers(blocks: nn.ModuleList) -> None:
    """Give every module with a `layer_idx` (attention: KV-cache slot) the index of its block."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx") and (module.layer_idx is None or isinstance(module.layer_idx, int)):
                module.layer_idx = i


def keep_blocks(model: nn.Module, adapter: Adapter, keep: list[int]) -> None:
    """Keep only the blocks `keep` (original indices, in order) and make config and indices consistent."""
    check_block_surgery(adapter, model)
    blocks = adapter.blocks(model)
    old = len(blocks)
    kept = nn.ModuleList([blocks[i] for i in keep])
    parent_name, _, leaf = adapter.blocks_path.rpartition(".")
    parent = model.base_model.get_submodule(parent_name) if parent_name else model.base_model
    setattr(parent, leaf, kept)
    _set_num_layers(model.config, len(keep))
    adapter.slice_layer_config(model.config, keep, old)
    reindex_layers(kept)


def remove_blocks(model: nn.Module, adapter: Adapter, indices: Iterable[int]) -> list[int]:
    """Delete the blocks at `indices`; returns the (original) indices that were kept."""
    n = depth(adapter, model)
    drop = set(validate_removal(n, indices))
    keep = [i for i in range(n) if i not in drop]
    keep_blocks(model, adapter, keep)
    return keep


@torch.no_grad()
def zero_branch(model: nn.Module, adapter: Adapter, index: int, which: str) -> str:
    """Make the attention or MLP branch of block `index` contribute exactly zero (weights and bias of its
    output projection set to 0). The checkpoint keeps its shapes: loadable everywhere, not smaller."""
    name = branch_module(adapter, model, which)
    module = adapter.blocks(model)[index].get_submodule(name)
    module.weight.zero_()
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()
    return f"{adapter.block_prefix(model, index)}.{name}"
