"""Family knowledge for structural surgery: what a block's residual branches end in, which config fields are
per-layer lists, and what a family cannot do without custom modeling code.

Kept here (not in the adapters) so structure surgery can grow without touching the quantization spine; the
adapter could later absorb `StructureInfo` as a hook (see docs/structure.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import RecipeError
from ..models.adapters import Adapter

# config attributes that hold one entry per decoder layer (sliced on removal)
PER_LAYER_LISTS = ("layer_types", "sliding_window_layers", "no_rope_layers", "swa_layers")


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


_INFO = {
    "llama": StructureInfo("self_attn.o_proj", "mlp.down_proj"),
    "gemma3_text": StructureInfo(
        "self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm", "post_feedforward_layernorm"
    ),
    "opt": StructureInfo("self_attn.out_proj", "fc2"),
    "gpt2": StructureInfo("attn.c_proj", "mlp.c_proj"),
    "bert": StructureInfo(None, None),
}


def structure_info(adapter: Adapter, model: nn.Module) -> StructureInfo:
    """The branch layout of this model's blocks (OPT with post-norm `do_layer_norm_before=False` has none)."""
    info = _INFO.get(model.config.model_type) or _INFO.get(adapter.family, StructureInfo(None, None))
    if adapter.family == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        return StructureInfo(None, None)
    return info


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
    cfg = model.config
    if adapter.family == "gpt2" and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise RecipeError(
            "this GPT-2 model scales attention by 1/(layer_idx+1) (scale_attn_by_inverse_layer_idx), so a shallower "
            "checkpoint would compute different attention scales after reloading",
            where="passes",
            fix="structural passes are not available for this model; drop them from the recipe",
        )
