"""The family adapters' public names, kept here for their many importers.

The generic `Adapter` lives in `families/base.py`; each family's knowledge in its own module under `families/`.
"""

from __future__ import annotations

from .families import (
    ADAPTERS,
    FUSED_GRAPH_TYPES,
    NO_BRANCHES,
    SUPPORTED_MODEL_TYPES,
    Adapter,
    StructureInfo,
    adapter_for,
    is_conv1d,
)

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
