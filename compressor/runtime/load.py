"""`compressor.load(path)`: turn a compressed-tensors artifact into a runnable torch model."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelError
from ..models.adapters import adapter_for
from ._ext import dense_kernels_for
from .dense16 import SIXTEEN_BIT, Embedding16, Linear16, TiedLinear16
from .factored import CONFIG_KEY as FACTORED_KEY
from .factored import build_factored
from .lora import read_lora
from .ops import ACTIVATION_MODES
from .qlinear import QuantEmbedding, QuantLinear
from .siblings import fuse_siblings

_QUANT_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def scheme_for(name: str, module: nn.Module, qcfg: dict) -> dict | None:
    """The weight scheme of the config group whose targets match this module, or None."""
    if any(_matches(t, name, module) for t in qcfg.get("ignore") or []):
        return None
    for group in qcfg.get("config_groups", {}).values():
        if any(_matches(t, name, module) for t in group.get("targets", [])):
            return group["weights"]
    return None


def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no .safetensors files in {folder}", fix="point at a directory written by compress")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (OSError, SafetensorError) as err:  # SafetensorError: a bad header or a short file
            raise ModelError(f"corrupt safetensors file {f.name}: {err}", fix="re-run compress to rewrite it") from None
    return tensors


def load(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    activations: str = "float",
    fuse_siblings: bool = True,
    keep_16bit: bool = True,
) -> nn.Module:
    """Load a compressed artifact: quantized linears become QuantLinear modules (packed weights kept).

    `activations` picks how the C++ kernels treat activations: "float" (default) keeps them in float32, so the
    logits are those of the dequantized model (what transformers computes from the artifact); "int8-decode"
    quantizes them to int8 per block for batches of fewer than 16 rows (faster decode, about 0.5% relative
    error per layer, like onnxruntime's accuracy_level 4 or llama.cpp); "int8" does so for every batch size.

    `fuse_siblings`: linears of a block that read the same input and share a kernel format (q|k|v, gate|up) run
    as one kernel call (runtime/siblings.py; bit-identical outputs, fewer per-call costs when decoding).

    `keep_16bit`: in a float32 model on a machine with the C++ kernels, float linears whose artifact weight is
    bfloat16 / float16 (the lm_head of a quantized artifact) keep it in 16 bits and run it widened exactly, with
    float32 sums (runtime/dense16.py: half the bytes per token, the float32 logits to summation-order rounding); a
    tied input embedding shares that 16-bit table. False upcasts them to float32 nn.Linear / nn.Embedding.

    Steps: the model built from config.json; its compressed layers swapped for quantized modules made from their
    tensors, and its 16-bit float linears for Linear16 (keep_16bit); every other tensor loaded as a dense state
    dict (and tied embeddings re-tied); the LoRA compensation attached; the kernels' weight layout prepared, and
    siblings joined.
    """
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations={activations!r}: expected one of {sorted(ACTIVATION_MODES)}")
    folder = Path(path)
    model, config, qcfg = _empty_model(folder, dtype)
    factored = (getattr(config, FACTORED_KEY, None) or {}).get("layers") or {}
    build_factored(model, factored, dtype)  # decomposed linears: two linears each (lowrank_A, lowrank_B)
    tensors = read_tensors(folder)
    per_layer = _pop_compressed(tensors)
    _replace_compressed(model, per_layer, tensors, qcfg, dtype, activations)
    tied = getattr(config, "tie_word_embeddings", False) and not per_layer.keys() & _embedding_names(model)
    kept = set()
    if keep_16bit and dtype == torch.float32 and dense_kernels_for(torch.device("cpu")):
        kept = _keep_16bit(model, tensors, tied)
    dense = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(dense, strict=False)
    if tied and not isinstance(model.get_output_embeddings(), TiedLinear16):
        model.tie_weights()
    _check_complete(model, result, set(per_layer) | kept, set(dense))
    _attach_lora(model, folder, dtype)
    for module in model.modules():  # the kernels' layout, made once here rather than inside a first (traced) call
        if type(module) is QuantLinear:
            module.packed_weight()
    if fuse_siblings:
        join_siblings(model, adapter_for(config.model_type))
    return model


def set_activations(model: nn.Module, activations: str) -> None:
    """Switch how the kernels of a loaded model treat activations ("float", "int8-decode", "int8"; see load)."""
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations={activations!r}: expected one of {sorted(ACTIVATION_MODES)}")
    for module in model.modules():
        if type(module) is QuantLinear:
            module.kernel_mode = ACTIVATION_MODES[activations]


def join_siblings(model: nn.Module, adapter) -> int:
    """Join the quantized linears that share an input within each block (the adapter's linear groups)."""
    groups = []
    for block in adapter.blocks(model):
        for names in adapter.linear_groups:
            members = [_submodule(block, n) for n in names]
            if all(type(m) is QuantLinear for m in members):
                groups.append(members)
    return fuse_siblings(groups)


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _empty_model(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, object, dict]:
    """The model of the artifact's config.json, freshly initialised in `dtype` (eval mode, no gradients), its
    config (without the quantization config) and the quantization config."""
    from transformers import AutoConfig

    from ..models.loading import _model_class

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"'{folder}' holds no config.json", fix="point at a directory written by compress")
    qcfg = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    adapter = adapter_for(config.model_type)
    model = _model_class(adapter, config).from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, config, qcfg


def _pop_compressed(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Take the compressed tensors (packed codes, scales, shapes, zero points, fp8 weights) out of `tensors`,
    grouped by the module that owns them."""
    per_layer: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in list(tensors):
        owner, _, leaf = key.rpartition(".")
        if leaf in _QUANT_LEAVES or (leaf == "weight" and tensors[key].dtype == torch.float8_e4m3fn):
            per_layer[owner][leaf] = tensors.pop(key)
    return per_layer


def _replace_compressed(
    model: nn.Module,
    per_layer: dict[str, dict[str, torch.Tensor]],
    tensors: dict[str, torch.Tensor],
    qcfg: dict,
    dtype: torch.dtype,
    activations: str,
) -> None:
    """Put a quantized module in place of every module with compressed tensors, under the scheme of the config
    group that targets it; the biases of those modules are popped from `tensors`."""
    modules = dict(model.named_modules())
    for name, parts in per_layer.items():
        module = modules.get(name)
        scheme = scheme_for(name, module, qcfg) if module is not None else None
        if scheme is None:
            raise ModelError(f"compressed tensors for '{name}' match no config group", fix="the artifact is corrupt")
        bias = tensors.pop(f"{name}.bias", None)
        if bias is not None:
            bias = bias.to(dtype)
        _set_submodule(model, name, _quantized_module(module, parts, bias, scheme, dtype, activations))


def _quantized_module(
    module: nn.Module,
    parts: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
    scheme: dict,
    dtype: torch.dtype,
    activations: str,
) -> nn.Module:
    """The QuantEmbedding (for an embedding) or QuantLinear that replaces `module`, made of its compressed parts."""
    if isinstance(module, nn.Embedding):
        new = QuantEmbedding.from_tensors(parts, None, scheme)
        new.dtype = dtype
        new.padding_idx = module.padding_idx
        scale = getattr(module, "embed_scale", None)  # Gemma scales looked-up rows
        new.embed_scale = float(scale) if scale is not None else None
        return new
    new = QuantLinear.from_tensors(parts, bias, scheme)
    new.kernel_mode = ACTIVATION_MODES[activations]
    return new


def _keep_16bit(model: nn.Module, tensors: dict[str, torch.Tensor], tied: bool) -> set[str]:
    """Swap each float nn.Linear whose artifact weight is bfloat16 / float16 (and whose bias, if any, is in the
    artifact) for a Linear16 holding that tensor; with `tied` embeddings whose table is 16-bit, the input embedding
    for an Embedding16 and the output one for a TiedLinear16 reading its table. Their tensors are popped from
    `tensors`; returns the names of the swapped modules."""
    names = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_name, embed_name = names.get(id(head)), names.get(id(embed))
    kept = set()
    for name, module in list(model.named_modules()):
        weight = tensors.get(f"{name}.weight")
        if (
            type(module) is not nn.Linear
            or weight is None
            or weight.dtype not in SIXTEEN_BIT
            or (tied and module is head)
        ):
            continue
        if module.bias is not None and f"{name}.bias" not in tensors:  # (a bias tied elsewhere, e.g. BERT's head)
            continue
        bias = tensors.pop(f"{name}.bias", None)
        _set_submodule(model, name, Linear16(tensors.pop(f"{name}.weight"), _float32(bias)))
        kept.add(name)
    table = tensors.get(f"{embed_name}.weight")
    if (
        tied
        and type(head) is nn.Linear
        and head.bias is None
        and f"{head_name}.weight" not in tensors  # (both stored: transformers' tie decides, as without keep_16bit)
        and isinstance(embed, nn.Embedding)
        and table is not None
        and table.dtype in SIXTEEN_BIT
    ):
        scale = getattr(embed, "embed_scale", None)  # Gemma scales looked-up rows
        new_embed = Embedding16(tensors.pop(f"{embed_name}.weight"), embed.padding_idx, _scalar(scale))
        _set_submodule(model, embed_name, new_embed)
        _set_submodule(model, head_name, TiedLinear16(new_embed))
        kept |= {embed_name, head_name}
    return kept


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def _scalar(t) -> float | None:
    return None if t is None else float(t)


def _attach_lora(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """Attach the artifact's LoRA compensation (lora/, when present) to the quantized linears it corrects."""
    for name, (down, up) in read_lora(folder).items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if type(target) is not QuantLinear:
            raise ModelError(f"the LoRA adapter corrects '{name}', not a quantized linear", fix="re-run compress")
        target.attach_correction(down.to(dtype), up.to(dtype))


def _embedding_names(model: nn.Module) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    mods = [model.get_input_embeddings(), model.get_output_embeddings()]
    return {names[id(m)] for m in mods if m is not None and id(m) in names}


def _check_complete(model: nn.Module, result, quantized: set[str], loaded: set[str]) -> None:
    """Every parameter must come from the artifact, belong to a swapped module (QuantLinear, Linear16, ...), or be
    tied to a loaded one."""
    state = model.state_dict(keep_vars=True)
    loaded_ptrs = {state[k].data_ptr() for k in loaded if k in state}
    missing = [
        k
        for k in result.missing_keys
        if k.rpartition(".")[0] not in quantized and "position_ids" not in k and state[k].data_ptr() not in loaded_ptrs
    ]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"artifact does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}",
            fix="re-run compress to rewrite the artifact",
        )
