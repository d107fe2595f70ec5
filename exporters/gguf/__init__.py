"""GGUF export for llama.cpp (`export: [gguf]`): metadata, tokenizer and tensors in llama.cpp's names.

Quantized layers are written exactly from the plan's codes (`compressor.quant.gguf`: INT8 g32 -> Q8_0, INT4 g32
symmetric -> Q4_0, float16 scales); a layer in any other format is refused, never re-quantized. Float tensors keep
the artifact's dtype (F32 / F16 / BF16); norms and other 1-D tensors are F32, as llama.cpp expects. Tensors are
spooled to a temporary file as they are made (a streamed model's are read from the checkpoint one at a time).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from compressor.errors import ModelError, RecipeError
from compressor.plan import QuantizedWeight
from compressor.quant.formats import Fp8Format, IntFormat
from compressor.quant.gguf import PACKERS, gguf_type_for, why_not_gguf

from ..source import ArtifactSource, Fetch
from .metadata import arch_for, copy_tokenizer, write_hparams, write_tokenizer

GGUF_FILE = "model.gguf"
RECORD = "gguf_export.json"


@dataclass
class GgufInput:
    """What the GGUF writer needs, from a run (`ArtifactSource`) or from a written artifact (`compressor.load`)."""

    config: object  # the text config
    tokenizer: object
    blocks: int
    dtype: torch.dtype  # the artifact's float tensors
    quantized: dict[str, QuantizedWeight]  # linear (or embedding) name -> its codes and scales
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # every other tensor, by its transformers key
    gguf_source: Path | None = None
    quiet: bool = False
    refusal: str | None = None  # why the model has no GGUF form (factored or corrected layers)


def export_gguf(source: ArtifactSource, folder: Path) -> list[str]:
    """Write `model.gguf` into `folder` for a run; returns the file written."""
    model, plan = source.model, source.plan

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in model.state_dict(keep_vars=True).items():
            owner, _, leaf = key.rpartition(".")
            if not (owner in plan.layers and leaf == "weight"):
                yield key, tensor

    inp = GgufInput(
        config=_text_config(model.config),
        tokenizer=source.tokenizer,
        blocks=len(source.adapter.blocks(model)),
        dtype=plan.dtype,
        quantized=plan.weights,
        tensors=tensors,
        gguf_source=source.gguf_source,
        quiet=source.quiet,
        refusal="decomposed or low-rank-corrected layers" if plan.factored or plan.compensations else None,
    )
    write_gguf(inp, folder / GGUF_FILE, fetch=source.fetch)
    return [GGUF_FILE]


def export_artifact(src: str | Path, out: Path, overwrite: bool = False, quiet: bool = False) -> list[str]:
    """`compress export-gguf`: a written artifact (safetensors) as OUT/model.gguf plus its tokenizer files,
    written atomically; returns the files."""
    from compressor.models.adapters import adapter_for
    from compressor.runtime.load import load

    from ..atomic import atomic_directory, check_output

    src, out = Path(src), Path(out)
    check_output(out, overwrite)
    model = load(src, keep_16bit=False, fuse_siblings=False)
    from transformers import AutoTokenizer

    quantized = {n: _from_buffers(m) for n, m in model.named_modules() if hasattr(m, "scheme")}
    corrected = any(getattr(m, "lora_down", None) is not None for m in model.modules())
    factored = bool((getattr(model.config, "compressor_lowrank", None) or {}).get("layers"))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in model.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in quantized and leaf != "bias":
                continue  # (its compressed-tensors buffers)
            yield key, tensor

    config = _text_config(model.config)
    inp = GgufInput(
        config=config,
        tokenizer=AutoTokenizer.from_pretrained(src),
        blocks=len(adapter_for(config.model_type).blocks(model)),
        dtype=_artifact_dtype(src),
        quantized=quantized,
        tensors=tensors,
        quiet=quiet,
        refusal="decomposed or low-rank-corrected layers" if corrected or factored else None,
    )
    with atomic_directory(out, overwrite) as tmp:
        types = write_gguf(inp, tmp / GGUF_FILE)
        record = {"source": src.name, "file": GGUF_FILE, "tensors": types}  # (also marks OUT as ours: --overwrite)
        (tmp / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return [GGUF_FILE, RECORD]


def write_gguf(inp: GgufInput, path: Path, fetch: Fetch | None = None) -> dict[str, str]:
    """The GGUF file: refusals first (nothing written), then metadata, tokenizer and tensors; returns each
    tensor's GGUF name -> type."""
    spec = arch_for(inp.config)
    refusals = [f"{n}: {why_not_gguf(qw.fmt, qw.scale_dtype)}" for n, qw in inp.quantized.items() if not _type(qw)]
    if inp.refusal:
        refusals.append(f"{inp.refusal} have no GGUF form (llama.cpp runs dense linears)")
    if refusals:
        raise RecipeError(
            f"cannot write GGUF: {refusals[0]}",
            where="export",
            fix="requantize to a GGUF type (recipes/w4-gguf.yaml), or export safetensors / ONNX instead",
        )
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[spec.arch], use_temp_file=True)
    writer.add_name(getattr(inp.config, "_name_or_path", "") or "compressed model")
    writer.add_quantized_by("compressor")
    write_hparams(writer, inp.config, inp.blocks)
    if inp.gguf_source is not None:
        copy_tokenizer(writer, inp.gguf_source)
    else:
        write_tokenizer(writer, inp.tokenizer, inp.config.vocab_size)
    names = gguf.get_tensor_name_map(spec.arch, inp.blocks)
    types: dict[str, str] = {}
    for key, data, qtype in _tensors(inp, spec, fetch):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {key}", fix="export safetensors or ONNX")
        writer.add_tensor(name, data, raw_dtype=qtype)
        types[name] = qtype.name
    writer.add_file_type(_file_type(inp))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=not inp.quiet)
    writer.close()
    return types


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _artifact_dtype(folder: Path) -> torch.dtype:
    """The dtype an artifact stores its float tensors in (its config.json `dtype`)."""
    declared = json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    return getattr(torch, declared) if declared in ("float16", "bfloat16", "float32") else torch.float32


def _from_buffers(module) -> QuantizedWeight:
    """The codes and scales a `compressor.load` QuantLinear holds (its compressed-tensors buffers)."""
    from ..onnx.weights import from_buffers

    lw = from_buffers(module)
    group = None if module.scheme.get("strategy") == "channel" else lw.group
    fmt = IntFormat(lw.bits, group, lw.zero is None) if module.scheme["type"] != "float" else None
    scale_dtype = str(module.weight_scale.dtype).removeprefix("torch.")
    if fmt is None:
        return QuantizedWeight(Fp8Format.of_scheme(module.scheme), lw.codes, lw.scale, None, scale_dtype)
    return QuantizedWeight(fmt, lw.codes.to(torch.int8), lw.scale.to(torch.float32), lw.zero, scale_dtype)


def _type(qw: QuantizedWeight) -> str | None:
    return gguf_type_for(qw.fmt, qw.scale_dtype)


def _tensors(inp: GgufInput, spec, fetch: Fetch | None):
    """(transformers key, data, GGML type) of every tensor, tied copies skipped, q/k permuted for llama."""
    config = inp.config
    for name, qw in inp.quantized.items():
        key = f"{name}.weight"
        codes, scale = _permuted(key, qw.codes, config, spec), _permuted(key, qw.scale, config, spec)
        yield key, PACKERS[_type(qw)](codes, scale), gguf.GGMLQuantizationType[_type(qw)]
    seen: set[int] = set()
    for key, tensor in inp.tensors():
        ident = id(tensor) if tensor.is_meta else tensor.untyped_storage().data_ptr()
        if ident in seen or (key.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)):
            continue  # tied copy: llama.cpp uses the token embeddings as the output when `output` is absent
        seen.add(ident)
        t = fetch(key) if tensor.is_meta else tensor.detach()
        if not t.is_floating_point():
            continue
        if spec.norm_shift and key.endswith("norm.weight"):
            t = t.float() + spec.norm_shift
        yield key, *_float_data(_permuted(key, t, config, spec), inp.dtype)


def _permuted(key: str, t: torch.Tensor, config, spec) -> torch.Tensor:
    """llama.cpp's llama rotary layout: q/k rows of each head interleaved (as convert_hf_to_gguf.py permutes)."""
    if not spec.permute_qk or not (key.endswith("q_proj.weight") or key.endswith("k_proj.weight")):
        return t
    heads = config.num_attention_heads
    if key.endswith("k_proj.weight"):
        heads = getattr(config, "num_key_value_heads", None) or heads
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _float_data(t: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float tensor in the artifact's dtype (1-D tensors in float32, as llama.cpp keeps norms and biases)."""
    if t.dim() == 1 or dtype == torch.float32:
        return t.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32
    if dtype == torch.float16:
        return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def _file_type(inp: GgufInput) -> gguf.LlamaFileType:
    """The file's headline type: the type most quantized weights have (float: the artifact dtype)."""
    counts: dict[str, int] = {}
    for qw in inp.quantized.values():
        counts[_type(qw)] = counts.get(_type(qw), 0) + qw.shape[0] * qw.shape[1]
    if counts:
        return gguf.LlamaFileType[f"MOSTLY_{max(counts, key=counts.get)}"]
    return {torch.float16: gguf.LlamaFileType.MOSTLY_F16, torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}.get(
        inp.dtype, gguf.LlamaFileType.ALL_F32
    )
