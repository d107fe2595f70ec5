"""The llama family: llama, mistral, qwen2, qwen3 and gemma3_text (pre-norm blocks, q/k/v and gate/up linears).

gemma3 differs in two places: its norms scale by (1 + weight), and each branch ends in a post-norm, which is
then what adds to the residual stream. Only llama, mistral and qwen2 take the fused ONNX decoder graph.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, StructureInfo


class LlamaAdapter(Adapter):
    def norm_offset(self, norm: nn.Module) -> float:
        """Gemma norms scale by (1 + weight)."""
        return 1.0 if "Gemma" in type(norm).__name__ else 0.0

    def slice_layer_config(self, config, keep: list[int], old_depth: int) -> None:
        """Also qwen2/3's `max_window_layers`: the layers below it use full attention."""
        super().slice_layer_config(config, keep, old_depth)
        mwl = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int):
            config.max_window_layers = sum(1 for i in keep if i < mwl)


LLAMA = LlamaAdapter(
    "llama",
    ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"),
    "layers",
    (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    scale_sources={
        "self_attn.q_proj": ("input_layernorm",),
        "self_attn.o_proj": ("self_attn.v_proj",),
        "mlp.gate_proj": ("pre_feedforward_layernorm", "post_attention_layernorm"),  # gemma3 first
        "mlp.down_proj": ("mlp.up_proj",),  # act(gate) * up is linear in up's output
    },
    branches=StructureInfo("self_attn.o_proj", "mlp.down_proj"),
    branches_by_type={
        "gemma3_text": StructureInfo(
            "self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm", "post_feedforward_layernorm"
        ),
    },
    fused_graph_types=("llama", "mistral", "qwen2"),
)
