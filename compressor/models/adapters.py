"""One small adapter per model family: where the blocks are and which linears a block holds.

`linear_groups` lists a block's linears in execution order, grouped by shared input (q/k/v read the same
normed hidden state, gate/up too), which lets a solver treat a group as one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    blocks_path: str  # relative to model.base_model
    linear_groups: tuple[tuple[str, ...], ...]
    decoder: bool = True
    extra: dict = field(default_factory=dict)
    # activation-aware scaling: a group's first linear -> modules (relative to the block) that may produce its
    # input, first existing one wins; a norm (scale folded into its weight) or a linear (into its output rows)
    scale_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

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

    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]

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


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D keeps its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_LLAMA_SCALE_SOURCES = {
    "self_attn.q_proj": ("input_layernorm",),
    "self_attn.o_proj": ("self_attn.v_proj",),
    "mlp.gate_proj": ("pre_feedforward_layernorm", "post_attention_layernorm"),  # gemma3 first
    "mlp.down_proj": ("mlp.up_proj",),  # act(gate) * up is linear in up's output
}

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"),
        "layers",
        _LLAMA_GROUPS,
        scale_sources=_LLAMA_SCALE_SOURCES,
    ),
    Adapter(
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
    ),
    Adapter(
        "gpt2",
        ("gpt2",),
        "h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        scale_sources={"attn.c_attn": ("ln_1",), "mlp.c_fc": ("ln_2",)},
    ),
    Adapter(
        "bert",
        ("bert", "roberta", "xlm-roberta"),
        "encoder.layer",
        (
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            ("attention.output.dense",),
            ("intermediate.dense",),
            ("output.dense",),
        ),
        decoder=False,
    ),
)

SUPPORTED_MODEL_TYPES = sorted({t for a in ADAPTERS for t in a.model_types})


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a config's model_type, or a ModelError listing the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ModelError(
        f"unsupported architecture '{model_type}'",
        fix=f"use a model of a supported family: {', '.join(SUPPORTED_MODEL_TYPES)}",
    )
