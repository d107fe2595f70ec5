"""The model families, one module each, and the registry that maps a config's model_type to its adapter."""

from __future__ import annotations

from ...errors import ModelError
from .base import NO_BRANCHES, Adapter, StructureInfo, is_conv1d
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLAMA
from .opt import OPT

__all__ = [
    "ADAPTERS",
    "FUSED_GRAPH_TYPES",
    "NO_BRANCHES",
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "StructureInfo",
    "adapter_for",
    "is_conv1d",
]

ADAPTERS: tuple[Adapter, ...] = (LLAMA, OPT, GPT2, BERT)

SUPPORTED_MODEL_TYPES = sorted({t for a in ADAPTERS for t in a.model_types})

FUSED_GRAPH_TYPES = tuple(t for a in ADAPTERS for t in a.model_types if a.fused_graph(t))


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a config's model_type, or a ModelError listing the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ModelError(
        f"unsupported architecture '{model_type}'",
        fix=f"use a model of a supported family: {', '.join(SUPPORTED_MODEL_TYPES)}",
    )
