"""The GPT-2 family: Conv1D linears ([in, out] weights), config names n_layer / n_head / n_embd."""

from __future__ import annotations

from ...errors import RecipeError
from .base import Adapter, StructureInfo


class Gpt2Adapter(Adapter):
    def check_block_surgery(self, config) -> None:
        """Refuse models whose attention scale depends on the layer index (it would change after reloading)."""
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise RecipeError(
                "this GPT-2 model scales attention by 1/(layer_idx+1) (scale_attn_by_inverse_layer_idx), so a "
                "shallower checkpoint would compute different attention scales after reloading",
                where="passes",
                fix="structural passes are not available for this model; drop them from the recipe",
            )


GPT2 = Gpt2Adapter(
    "gpt2",
    ("gpt2",),
    "h",
    (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    scale_sources={"attn.c_attn": ("ln_1",), "mlp.c_fc": ("ln_2",)},
    branches=StructureInfo("attn.c_proj", "mlp.c_proj"),
    fan_in_fan_out=True,
    config_names=("n_layer", "n_head", "n_embd"),
)
