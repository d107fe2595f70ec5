"""Structural surgery's questions to a model's family: what a block's residual branches end in and what a family
cannot do without custom modeling code (the adapter also slices per-layer config entries: `slice_layer_config`).

The answers are the family adapters' (compressor/models/families/); `StructureInfo` is re-exported here.
"""

from __future__ import annotations

from torch import nn

from ..errors import RecipeError
from ..models.adapters import Adapter, StructureInfo

__all__ = ["StructureInfo", "branch_module", "check_block_surgery", "structure_info"]


def structure_info(adapter: Adapter, model: nn.Module) -> StructureInfo:
    """The branch layout of this model's blocks (OPT with post-norm `do_layer_norm_before=False` has none)."""
    return adapter.structure_info(model.config)


def branch_module(adapter: Adapter, model: nn.Module, which: str) -> str:
    """Relative name of the output projection of `which` ('attention' or 'mlp'), or a RecipeError."""
    name = structure_info(adapter, model).projection(which)
    if name is None:
        raise RecipeError(
            f"{which}-only operations are not possible for '{model.config.model_type}': its blocks are post-norm, "
            "so a sublayer cannot be skipped exactly",
            where="passes",
            fix="use whole-block removal (granularity: block)",
        )
    return name


def check_block_surgery(adapter: Adapter, model: nn.Module) -> None:
    """Refuse families whose per-layer behaviour is baked into a layer's index in a way a reload would change."""
    adapter.check_block_surgery(model.config)
