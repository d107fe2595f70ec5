"""Export the compressed model as a compressed-tensors safetensors checkpoint (sharded) with its tokenizer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from compressor.runtime.factored import CONFIG_KEY as FACTORED_KEY
from compressor.runtime.lora import LORA_DIR, write_lora
from compressor.schema.common import parse_size

from .compressed_tensors import layer_tensors, quantization_config
from .sentence_files import copy_sentence_transformers_files, source_folder
from .source import ArtifactSource, Fetch


def export_state_dict(source: ArtifactSource, dense_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model tensors with every planned layer replaced by its compressed tensors; tied copies dropped.

    Parameters of a streamed model that are still on disk come back as meta tensors (shape and dtype only);
    `write_shards` reads them from the checkpoint when it writes their shard.
    """
    model, plan = source.model, source.plan
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    quantized = set(plan.layers)
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf == "weight":
            out.update(layer_tensors(owner, plan.weights[owner]))
            continue
        ident = id(tensor) if tensor.is_meta else (tensor.untyped_storage().data_ptr() if tensor.numel() else None)
        if ident is not None and ident in seen and seen[ident] != key:
            continue  # tied weight (e.g. lm_head = embed_tokens): transformers re-ties on load
        if ident is not None:
            seen[ident] = key
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(dense_dtype)
        out[key] = t if t.is_meta else t.contiguous()
    return out


def write_shards(
    tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int, fetch: Fetch | None = None
) -> list[str]:
    """Write tensors into safetensors shards (HF naming and index); returns the file names.

    Meta tensors are placeholders: `fetch(name)` gives their values, read shard by shard, so at most one
    shard's worth of them is in memory.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes

    def shard_tensors(keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            t = tensors[k]
            out[k] = fetch(k).to(t.dtype).contiguous() if t.is_meta else t
        return out

    if len(shards) == 1:
        save_file(shard_tensors(shards[0]), str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_file(shard_tensors(keys), str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def export_safetensors(source: ArtifactSource, folder: Path) -> list[str]:
    """Write weights, config (with quantization_config), generation config, tokenizer and the source's
    sentence-transformers files into `folder`."""
    model, adapter, plan = source.model, source.adapter, source.plan
    tensors = export_state_dict(source, plan.dtype)
    files = write_shards(tensors, folder, parse_size(source.max_shard_size), source.fetch)
    config = model.config
    config.quantization_config = quantization_config(plan)
    config.dtype = plan.dtype
    if plan.factored:  # compressor.load builds these layers as two linears each (runtime/factored.py)
        setattr(config, FACTORED_KEY, {"format": "lowrank_A/lowrank_B", "layers": dict(sorted(plan.factored.items()))})
    try:
        config.save_pretrained(folder)
    finally:
        del config.quantization_config
        if plan.factored:
            delattr(config, FACTORED_KEY)
    if getattr(model, "generation_config", None) is not None and adapter.decoder:
        model.generation_config.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    files += copy_sentence_transformers_files(source_folder(model), folder)
    if plan.compensations:
        files += write_lora(
            folder,
            {name: (c.down.to(c.dtype), c.up.to(c.dtype)) for name, c in plan.compensations.items()},
            task_type="CAUSAL_LM" if adapter.decoder else None,
            fan_in_fan_out=adapter.fan_in_fan_out,
            base_model=source.hub_repo_id,
        )
    for f in files:
        (folder / f).chmod(0o644)
    return files


SIZE_PARTS = (
    "quantized_weights",
    "quantization_params",
    "embeddings",
    "float_linears",
    "other",
    "lowrank_compensation",
)


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, read from its header (8-byte length, then JSON offsets)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def size_breakdown(folder: Path, roles: dict[str, str]) -> dict[str, int]:
    """Bytes of the written weights by part (SIZE_PARTS), from the shards' headers.

    `roles` maps module names to "quantized", "embeddings" or "float_linears"; a quantized module's codes count as
    quantized weights and its scales, zero points and shape as quantization parameters; tensors of modules
    without a role (norms) and every bias count as "other"; the LoRA adapter's factors as "lowrank_compensation".
    """
    parts = dict.fromkeys(SIZE_PARTS, 0)
    for shard in sorted((folder / LORA_DIR).glob("*.safetensors")):
        parts["lowrank_compensation"] += sum(_tensor_bytes(shard).values())
    for shard in sorted(folder.glob("*.safetensors")):
        for key, nbytes in _tensor_bytes(shard).items():
            owner, _, leaf = key.rpartition(".")
            role = roles.get(owner)
            if role == "quantized" and leaf in ("weight_packed", "weight"):
                parts["quantized_weights"] += nbytes
            elif role == "quantized" and leaf.startswith("weight_"):  # scale, zero point, shape
                parts["quantization_params"] += nbytes
            elif role in ("embeddings", "float_linears") and leaf == "weight":
                parts[role] += nbytes
            else:
                parts["other"] += nbytes
    return parts
