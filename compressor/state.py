"""CompressionState: everything passes read and write during one run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models.loading import LoadedModel
from .plan import Plan
from .recipe import Recipe
from .schema import WeightScheme


@dataclass
class CompressionState:
    loaded: LoadedModel
    recipe: Recipe
    calibration_ids: torch.Tensor | None = None
    plan: Plan = field(default_factory=Plan)
    # per-layer weight schemes chosen by `allocate_bits` (full module name -> WeightScheme, None = keep float)
    layer_schemes: dict[str, WeightScheme | None] = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # pass-owned sections merged into report.json (e.g. "scores")
    extra_files: dict[str, bytes] = field(default_factory=dict)  # artifact-relative path -> bytes (plots)
    quiet: bool = False

    @property
    def model(self):
        return self.loaded.model

    @property
    def adapter(self):
        return self.loaded.adapter

    def calibration_chunks(self) -> list[torch.Tensor]:
        ids = self.calibration_ids
        bs = self.recipe.calibration.batch_size
        return [ids[i : i + bs] for i in range(0, ids.shape[0], bs)]
