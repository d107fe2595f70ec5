"""Recipe schema of the `lowrank` pass: low-rank compensation of the quantization error."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from .common import Strict

if TYPE_CHECKING:  # the recipe (and so `compress --help`) loads without torch
    import torch


class LowRankPass(Strict):
    """Fit, for every quantized block linear, a rank-r correction of its quantization error (activation-whitened
    SVD on the calibration inputs, as EoRA / LQER do) and ship it as a PEFT LoRA adapter beside the artifact.

    The correction is fitted by the `quantize` pass that must follow, layer by layer with the same input
    statistics GPTQ uses, so later blocks are calibrated on the corrected outputs.
    """

    type: Literal["lowrank"]
    mode: Literal["compensate"] = Field(
        "compensate", description="compensate: correct the quantization error of the following quantize pass"
    )
    rank: int = Field(
        32, ge=1, le=4096, description="rank of each layer's correction (capped at its width); unused with a budget"
    )
    budget_bits_per_weight: float | None = Field(
        None,
        gt=0,
        le=32,
        description="instead of `rank`: the bits per weight the corrections may add over the corrected layers, "
        "ranks allocated per layer (the greatest share of each layer's error removed per stored number)",
    )
    max_rank: int = Field(128, ge=1, le=4096, description="budget: the largest rank one layer may get")
    allocation_samples: int = Field(
        16, gt=0, description="budget: calibration samples (the first N) in the sweep that measures error spectra"
    )
    targets: list[str] = Field(
        default_factory=list,
        description="module-name regexes of the quantized linears to correct; empty = every quantized block linear",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="dtype the factors are stored (and evaluated) in; auto = the artifact's float dtype when it is "
        "16-bit, else float16",
    )
    damp: float = Field(
        0.01, gt=0, lt=1, description="dampening of the input Gram matrix, fraction of its mean diagonal"
    )

    @field_validator("targets")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"targets: {pattern!r} is not a regular expression ({err})") from None
        return v

    def storage_dtype(self, artifact_dtype: torch.dtype) -> torch.dtype:
        """The factors' dtype in an artifact whose dense tensors are `artifact_dtype`."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        return artifact_dtype if artifact_dtype in (torch.float16, torch.bfloat16) else torch.float16

    def applies_to(self, name: str) -> bool:
        return not self.targets or any(re.search(p, name) for p in self.targets)

    @property
    def needs_calibration(self) -> bool:
        return True
