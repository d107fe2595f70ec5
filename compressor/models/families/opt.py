"""The OPT family. `do_layer_norm_before=False` (post-norm, e.g. opt-350m) leaves no isolatable branches and no
norm in front of q/k/v or fc1 to fold an activation scale into."""

from __future__ import annotations

from .base import NO_BRANCHES, Adapter, StructureInfo


def _pre_norm(config) -> bool:
    return getattr(config, "do_layer_norm_before", True)


class OptAdapter(Adapter):
    def folds_scales(self, config) -> bool:
        """Pre-LN OPT only: a post-norm does not produce q/k/v's or fc1's input."""
        return _pre_norm(config)

    def structure_info(self, config) -> StructureInfo:
        """Post-norm OPT has no isolatable branches."""
        return super().structure_info(config) if _pre_norm(config) else NO_BRANCHES


OPT = OptAdapter(
    "opt",
    ("opt",),
    "decoder.layers",
    (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    # pre-LN OPT only (checked when folding): norms feed q/k/v and fc1
    scale_sources={"self_attn.q_proj": ("self_attn_layer_norm",), "fc1": ("final_layer_norm",)},
    branches=StructureInfo("self_attn.out_proj", "fc2"),
)
