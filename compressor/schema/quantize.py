"""Recipe schema of the `quantize` pass."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import Strict


class WeightScheme(Strict):
    """How one linear's weight is quantized."""

    format: Literal["int", "fp8"] = "int"
    bits: Literal[2, 3, 4, 8] = 4
    strategy: Literal["group", "channel", "tensor", "block"] = "group"
    group_size: int | None = Field(128, description="columns per group (strategy: group)")
    block_size: tuple[int, int] = Field((128, 128), description="FP8 block shape (strategy: block)")
    symmetric: bool = True

    @field_validator("group_size")
    @classmethod
    def _positive_group(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"group_size must be a positive integer, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> WeightScheme:
        if self.format == "fp8":
            if self.bits != 8:
                raise ValueError("format fp8 has 8 bits (E4M3); set bits: 8 or leave it out")
            if self.strategy == "group":
                raise ValueError("fp8 supports strategy tensor, channel or block, not group")
            if not self.symmetric:
                raise ValueError("fp8 weights are symmetric; remove 'symmetric: false'")
        else:
            if self.strategy == "block":
                raise ValueError("strategy block is for fp8; use group or channel for int")
            if self.strategy == "group" and self.group_size is None:
                raise ValueError("strategy group needs group_size")
        return self


class QuantizePass(Strict):
    """Quantize every linear of every block (and optionally lm_head) by the given scheme and method."""

    type: Literal["quantize"]
    method: Literal["rtn", "gptq"] = "gptq"
    weights: WeightScheme = WeightScheme()
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype scales are stored in (their rounding is applied during quantization)"
    )
    group_policy: Literal["fallback", "ragged"] = Field(
        "fallback",
        description="when group_size does not divide a layer's input width: 'fallback' to the largest power of "
        "two >= 16 that divides it (else channel-wise), recorded per layer, so transformers loads the artifact; "
        "'ragged' keeps a short last group (compressor.load only)",
    )
    clip_search: bool | None = Field(
        None,
        description="shrink each group's range to the factor in [0.75, 1] that minimises its squared rounding error "
        "(MSE-optimal clipping; GPTQ weights each column's error by diag(H)); false: the min-max range; null "
        "(default): on for GPTQ, off for RTN (unweighted, it raised SmolLM2 W4 g64 RTN's perplexity rise from "
        "+22.1% to +36.1%)",
    )
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ dampening, fraction of mean(diag(H))")
    gptq_block_size: int = Field(128, gt=0, description="GPTQ lazy-batch update width")
    hessian_token_clip: float | None = Field(
        None,
        gt=1,
        description="GPTQ: cap each token's norm at this multiple of its window's median token norm before it enters H "
        "(tames attention-sink 'massive activation' tokens); null (default) disables: with act-order and MSE "
        "clipping it costs quality (README, issue #32)",
    )
    act_order: bool = Field(
        True,
        description="GPTQ: quantize columns by decreasing Hessian diagonal (static groups, so no g_idx is stored)",
    )
    static_groups: bool = Field(
        False, description="GPTQ: group scales from the unquantized weight (forced by act_order)"
    )
    diagnostics: bool = Field(
        False,
        description="GPTQ: per-layer solver diagnostics in report.json `gptq_diagnostics`: the output error "
        "tr(dW H dW^T) of GPTQ and of round-to-nearest under H before the token clip (and after it), the weights "
        "clamped at the grid's ends, the damping relative to median(diag H)",
    )
    awq: bool = Field(
        False,
        description="activation-aware scaling before RTN/GPTQ: per-input-channel scales (mean|x|^alpha, alpha "
        "searched on calibration statistics) folded into the preceding norm or linear where the family allows",
    )
    awq_grid: int = Field(20, ge=1, description="awq: number of alpha values tried in [0, 1)")
    lm_head: bool = Field(False, description="also quantize the output embeddings / lm_head (RTN, same scheme)")
    embeddings: bool = Field(False, description="also quantize the input embeddings (RTN, same scheme)")
    ignore: list[str] = Field(default_factory=list, description="module-name regexes to leave in full precision")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.awq

    @model_validator(mode="after")
    def _method_fits_format(self) -> QuantizePass:
        if self.weights.format == "fp8" and self.method == "gptq":
            raise ValueError("fp8 weights use method rtn (GPTQ is for int formats)")
        if self.diagnostics and self.method != "gptq":
            raise ValueError("diagnostics describe GPTQ solves; set method: gptq or remove diagnostics")
        return self
