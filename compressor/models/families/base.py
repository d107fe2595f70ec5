"""What every family adapter declares, with the defaults most families share.

A family module (llama.py, opt.py, ...) builds one `Adapter` (or a subclass overriding the rules that differ) and
the package's `__init__` collects them. Nothing here names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import ModelError

# config attributes that hold one entry per decoder layer (sliced on removal), across transformers families
PER_LAYER_LISTS = ("layer_types", "sliding_window_layers", "no_rope_layers", "swa_layers")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D keeps its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class StructureInfo:
    """A block's two residual branches: the projection that ends each, and the module whose output is added
    to the residual stream (the same module unless a post-norm follows the projection, as in gemma3).

    A branch whose output projection is zeroed contributes exactly nothing to the residual stream (biases are
    zeroed too; gemma3's post-norms map zero to zero), so a sublayer can be skipped without new modeling code.
    `None` means the family has no isolatable branches (post-norm bert: LayerNorm(x + 0) != x).
    """

    attention_out: str | None
    mlp_out: str | None
    attention_branch: str | None = None
    mlp_branch: str | None = None

    def branch(self, which: str) -> str | None:
        """Module whose output is the branch's contribution to the residual stream."""
        if which == "attention":
            return self.attention_branch or self.attention_out
        return self.mlp_branch or self.mlp_out

    def projection(self, which: str) -> str | None:
        return self.attention_out if which == "attention" else self.mlp_out

    @property
    def linear_branches(self) -> bool:
        """Whether each branch's contribution is its projection's output (least-squares correction applies)."""
        return self.attention_out is not None and self.attention_branch is None and self.mlp_branch is None


NO_BRANCHES = StructureInfo(None, None)


@dataclass(frozen=True)
class Adapter:
    """One model family: where its blocks are, which linears a block holds, and the family's rules.

    `linear_groups` lists a block's linears in execution order, grouped by shared input (q/k/v read the same
    normed hidden state, gate/up too), which lets a solver treat a group as one matrix.
    """

    family: str
    model_types: tuple[str, ...]
    blocks_path: str  # relative to model.base_model
    linear_groups: tuple[tuple[str, ...], ...]
    decoder: bool = True
    extra: dict = field(default_factory=dict)
    # activation-aware scaling: a group's first linear -> modules (relative to the block) that may produce its
    # input, first existing one wins; a norm (scale folded into its weight) or a linear (into its output rows)
    scale_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # structural surgery: the blocks' residual branches, and per-model_type exceptions
    branches: StructureInfo = NO_BRANCHES
    branches_by_type: dict[str, StructureInfo] = field(default_factory=dict)
    # model types the fused ONNX decoder graph (exporters/onnx/fused.py) supports
    fused_graph_types: tuple[str, ...] = ()
    # linears are Conv1D modules storing [in, out] (PEFT's `fan_in_fan_out`)
    fan_in_fan_out: bool = False
    # config attribute names of (layer count, attention heads, hidden size)
    config_names: tuple[str, str, str] = ("num_hidden_layers", "num_attention_heads", "hidden_size")

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.blocks_path)

    def block_prefix(self, model: nn.Module, index: int) -> str:
        """Full module name of block `index` inside `model` (e.g. 'model.layers.3')."""
        blocks = self.blocks(model)
        for name, mod in model.named_modules():
            if mod is blocks:
                return f"{name}.{index}"
        raise ModelError("cannot locate decoder blocks in the model")

    def block_prefixes(self, model: nn.Module) -> list[str]:
        """Full module names of every block."""
        return [self.block_prefix(model, i) for i in range(len(self.blocks(model)))]

    def scale_source(self, block: nn.Module, group: tuple[str, ...]) -> tuple[str, nn.Module] | None:
        """The module whose output is `group`'s input and can absorb a per-channel scale, or None."""
        for path in self.scale_sources.get(group[0], ()):
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear) or is_conv1d(module):
                width = module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]
                target = block.get_submodule(group[0])
                needed = target.weight.shape[0] if is_conv1d(target) else target.weight.shape[1]
                if width != needed:  # e.g. v_proj -> o_proj under grouped-query attention
                    return None
            return path, module
        return None

    def folds_scales(self, config) -> bool:
        """Whether activation-aware scales may be folded into this model's scale sources."""
        return True

    def norm_offset(self, norm: nn.Module) -> float:
        """c where the norm scales by (c + weight): a folded divisor d makes the weight (c + weight) / d - c."""
        return 0.0

    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]

    def structure_info(self, config) -> StructureInfo:
        """The residual branches of this model's blocks."""
        return self.branches_by_type.get(config.model_type, self.branches)

    def check_block_surgery(self, config) -> None:
        """Raise a RecipeError where removing blocks would change the model in a way a reload would not keep."""

    def slice_layer_config(self, config, keep: list[int], old_depth: int) -> None:
        """Keep the per-layer config entries of the blocks `keep` (original indices) after block removal."""
        for key in PER_LAYER_LISTS:
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and len(value) == old_depth:
                setattr(config, key, [value[i] for i in keep])

    def fused_graph(self, model_type: str) -> bool:
        """Whether the fused ONNX decoder graph supports `model_type`."""
        return model_type in self.fused_graph_types

    def cache_geometry(self, config) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of a decoder config."""
        layers, heads, hidden = (getattr(config, name) for name in self.config_names)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return layers, kv_heads, getattr(config, "head_dim", None) or hidden // heads

    @staticmethod
    def get_weight(module: nn.Module) -> torch.Tensor:
        """Weight as [out_features, in_features] float32 (embeddings: [vocab, hidden])."""
        w = module.weight.data
        return (w.t() if is_conv1d(module) else w).to(torch.float32)

    @staticmethod
    def param_layout(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """An [out, in] weight in the module's own parameter layout (Conv1D: [in, out])."""
        return w.t().contiguous() if is_conv1d(module) else w

    @staticmethod
    def set_weight(module: nn.Module, w: torch.Tensor) -> None:
        """Write back a [out, in] weight in the module's own layout and dtype."""
        target = module.weight.data
        target.copy_((w.t() if is_conv1d(module) else w).to(target.dtype))
