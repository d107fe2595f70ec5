"""What an artifact writer is given: the plan, the model's tensors and the few facts of the run it writes down.

Writers depend on this, never on the pipeline's state, the passes or the API: whatever runs the passes builds one
(`ArtifactSource.of(state)` for a `CompressionState`) and hands it to every writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.calibration.engine import Residency
from compressor.models.adapters import Adapter
from compressor.plan import Plan
from compressor.schema.onnx import OnnxExportConfig

Fetch = Callable[[str], torch.Tensor]  # a parameter's values from the source checkpoint, by name


@dataclass
class ArtifactSource:
    plan: Plan  # every decision of the run
    model: nn.Module  # as it stands; a streamed model's untouched parameters may still be meta tensors
    full_model: Callable[[], nn.Module]  # the model with every parameter in memory, dense tensors rounded to the
    # artifact's dtype (graph exporters trace it)
    adapter: Adapter  # the model family
    tokenizer: object
    fetch: Fetch | None  # reads meta parameters from the checkpoint (None: nothing is left on disk)
    max_shard_size: str  # safetensors shard size, e.g. '2GB'
    onnx: OnnxExportConfig
    hub_repo_id: str | None = None  # named as the LoRA adapter's base model when the run uploads
    quiet: bool = False  # no progress bars
    residency: Callable[[], Residency] | None = None  # a streamed model: brings its blocks in one at a time, as the
    # artifact stores them (graph exporters that build block by block use it instead of `full_model`)
    gguf_source: Path | None = None  # the GGUF file the model was loaded from (the GGUF export keeps its tokenizer)

    @classmethod
    def of(cls, state) -> ArtifactSource:
        """The source for a `compressor.state.CompressionState` (duck-typed: writers do not import the state).

        The plan's layout is recorded first if the passes ran outside the pipeline (which records it)."""
        if not state.plan.sealed:
            state.finish_plan()
        lazy, recipe = state.loaded.lazy, state.recipe
        return cls(
            plan=state.plan,
            model=state.model,
            full_model=state.artifact_model,
            adapter=state.adapter,
            tokenizer=state.loaded.tokenizer,
            fetch=lazy.tensor if lazy is not None else None,
            max_shard_size=recipe.max_shard_size,
            onnx=recipe.onnx,
            hub_repo_id=recipe.hub.repo_id if recipe.hub is not None else None,
            quiet=state.quiet,
            residency=state.artifact_residency if lazy is not None else None,
            gguf_source=_gguf_file(state.loaded.source),
        )


def _gguf_file(source) -> Path | None:
    """The local GGUF file a model source names, if it names one."""
    if not source.gguf_file:
        return None
    path = Path(source.location) / source.gguf_file
    return path if path.is_file() else None
