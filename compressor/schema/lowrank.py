"""Recipe schema of the `lowrank` pass: low-rank compensation of the quantization error, or decomposition of the
weights themselves (W replaced by B A under a parameter budget)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from .common import Strict

if TYPE_CHECKING:  # the recipe (and so `compress --help`) loads without torch
    import torch


class DecomposeBudget(Strict):
    """How much of the targeted linears a decomposition keeps: a share of their parameters, or a size in bytes
    (at the artifact's float dtype)."""

    params_kept: float | None = Field(None, gt=0, lt=1, description="share of the targeted layers' parameters kept")
    size: str | None = Field(None, description="size of the targeted layers after decomposition, e.g. '40MB'")

    @model_validator(mode="after")
    def _one(self):
        if (self.params_kept is None) == (self.size is None):
            raise ValueError("give exactly one of params_kept, size")
        return self


class LowRankPass(Strict):
    """`mode: compensate`: fit, for every quantized block linear, a rank-r correction of its quantization error
    (activation-whitened SVD on the calibration inputs, as EoRA / LQER do) and ship it as a PEFT LoRA adapter beside
    the artifact; the correction is fitted by the `quantize` pass that must follow, layer by layer with the same
    input statistics GPTQ uses, so later blocks are calibrated on the corrected outputs.

    `mode: decompose`: replace the targeted linears W by B A (ranks chosen per matrix under `budget`, fitted block
    by block on the calibration inputs the already-decomposed blocks produce); a matrix is factored only where
    r (out + in) < out x in, the rest stay dense.
    """

    type: Literal["lowrank"]
    mode: Literal["compensate", "decompose"] = Field(
        "compensate",
        description="compensate: correct the quantization error of the following quantize pass; decompose: replace "
        "the targeted linears by two factors",
    )
    method: Literal["whitened", "plain", "asvd"] = Field(
        "whitened",
        description="decompose: truncated SVD of W S with S S^T = H (whitened, SVD-LLM: least output error on the "
        "calibration inputs), S = diag(mean |x|^0.5) (asvd), or of W itself (plain); whitened and asvd then refit B "
        "given A in closed form",
    )
    budget: DecomposeBudget | None = Field(None, description="decompose: {params_kept: 0.8} or {size: '40MB'}")
    allocation: Literal["measured", "spectrum", "welore", "uniform"] = Field(
        "measured",
        description="decompose: ranks per matrix by an exact knapsack on each truncation's predicted KL (measured: "
        "the allocate_bits Fisher estimate on `allocation_samples` windows), on the method's own singular-value "
        "energy (spectrum), on W's spectrum with no data (welore), or the same share of parameters everywhere "
        "(uniform)",
    )
    rank_step: int = Field(8, ge=1, le=256, description="decompose: candidate ranks are multiples of this")
    check_probes: int = Field(
        8,
        ge=0,
        description="decompose, measured allocation: linears whose predicted KL is checked against the KL measured "
        "with only that linear truncated (rank correlation in report.json); 0: no check",
    )
    check_samples: int = Field(4, gt=0, description="decompose: held-out calibration windows of that check")
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
        description="module-name regexes of the linears to correct (compensate: quantized ones) or to decompose; "
        "empty = every (quantized) block linear",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="dtype the factors are stored (and evaluated) in; auto = the artifact's float dtype when it is "
        "16-bit, else float16",
    )
    damp: float = Field(
        0.01, gt=0, lt=1, description="dampening of the input Gram matrix, fraction of its mean diagonal"
    )

    @model_validator(mode="after")
    def _mode_fields(self):
        if self.mode == "decompose" and self.budget is None:
            raise ValueError("mode: decompose needs a budget ({params_kept: 0.8} or {size: ...})")
        if self.mode == "compensate" and self.budget is not None:
            raise ValueError("budget is for mode: decompose (compensate takes rank or budget_bits_per_weight)")
        if self.mode == "decompose" and self.budget_bits_per_weight is not None:
            raise ValueError("budget_bits_per_weight is for mode: compensate (decompose takes budget)")
        return self

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
        return self.mode == "compensate" or self.method != "plain" or self.allocation == "measured"
