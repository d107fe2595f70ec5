"""`compress densify ARTIFACT OUT`: an artifact with decomposed layers (`lowrank` mode decompose) written back as a
standard checkpoint, each factored layer's weight the product B A (no size gain; for tools that need a dense model,
e.g. transformers without custom code). Every other tensor and file is copied as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from compressor.errors import ModelError
from compressor.models.adapters import adapter_for
from compressor.runtime.factored import A_NAME, B_NAME, CONFIG_KEY
from compressor.runtime.load import read_tensors

from .atomic import atomic_directory
from .safetensors_export import write_shards

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def densify_artifact(src: str | Path, out: str | Path, overwrite: bool = False, max_shard_bytes: int = 2 * 10**9):
    """Write `src` with every factored layer multiplied back into one weight into `out` (atomically); returns the
    files written."""
    src, out = Path(src), Path(out)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ModelError(f"'{src}' holds no config.json", fix="point at a directory written by compress")
    config = json.loads(config_file.read_text())
    layers = (config.get(CONFIG_KEY) or {}).get("layers") or {}
    if not layers:
        raise ModelError(
            f"'{src}' has no decomposed layers (config.json has no {CONFIG_KEY})",
            fix="densify is for artifacts of a lowrank pass in mode decompose",
        )
    tensors = read_tensors(src)
    transpose = adapter_for(config["model_type"]).fan_in_fan_out  # gpt2's Conv1D stores [in, out]
    for name in layers:
        try:
            a, b = tensors.pop(f"{name}.{A_NAME}.weight"), tensors.pop(f"{name}.{B_NAME}.weight")
        except KeyError:
            raise ModelError(
                f"'{src}' lacks the factors of {name} that config.json names", fix="re-run compress to rewrite it"
            ) from None
        w = (b.to(torch.float32) @ a.to(torch.float32)).to(a.dtype)
        tensors[f"{name}.weight"] = (w.t() if transpose else w).contiguous()
        bias = tensors.pop(f"{name}.{B_NAME}.bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias
    del config[CONFIG_KEY]
    with atomic_directory(out, overwrite) as tmp:
        files = write_shards(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files.append("config.json")
        for extra in sorted(src.iterdir()):
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (*WEIGHT_FILES, "config.json"):
                shutil.copy(extra, tmp / extra.name)
                files.append(extra.name)
    return files
