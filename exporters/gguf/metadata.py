"""GGUF metadata for llama.cpp: the architecture, its hyperparameters in llama.cpp's keys, and the tokenizer.

Families: llama and mistral (llama.cpp's `llama` architecture, q/k rows permuted to its rotary layout), qwen2,
qwen3 and gemma3 (their own architectures, rotary halves as in transformers). The keys are those llama.cpp's
`convert_hf_to_gguf.py` writes for the same checkpoints.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from compressor.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufArch:
    """How one transformers family is written: llama.cpp's architecture, whether q/k rows are permuted, and the
    offset llama.cpp adds to RMSNorm weights (gemma stores w and computes with 1 + w)."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0


ARCHES = {
    "llama": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GgufArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GgufArch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GgufArch(gguf.MODEL_ARCH.QWEN3),
    "gemma3_text": GgufArch(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0),
}


def arch_for(config) -> GgufArch:
    """The GGUF architecture of a transformers config; a clear error for families GGUF export does not cover."""
    kind = config.model_type
    if kind not in ARCHES:
        raise ModelError(
            f"GGUF export does not support model type {kind!r}",
            fix=f"export safetensors or ONNX instead; GGUF covers {', '.join(sorted(ARCHES))}",
        )
    return ARCHES[kind]


def _rope_theta(config, layer_type: str = "full_attention") -> float | None:
    """The rotary base (of `layer_type` layers where the config keeps one per layer type, as gemma3 does)."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params)
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def write_hparams(writer: gguf.GGUFWriter, config, blocks: int) -> None:
    """The architecture's hyperparameters (block count as the artifact has them, after removal or fusion)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config) or 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gemma3_text":
        writer.add_sliding_window(config.sliding_window)
        local = _rope_theta(config, "sliding_attention") or getattr(config, "rope_local_base_freq", None)
        if local:
            writer.add_rope_freq_base_swa(float(local))
        if getattr(config, "layer_types", None):  # which layers slide (llama.cpp's per-layer pattern)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types[:blocks]])
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        writer.add_sliding_window(config.sliding_window)


# token types as llama.cpp reads them (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = (
    gguf.TokenType.NORMAL,
    gguf.TokenType.CONTROL,
    gguf.TokenType.USER_DEFINED,
    gguf.TokenType.UNUSED,
)


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model: tokens, types, merges, special ids and
    the chat template (from the tokenizer files, through gguf's SpecialVocab). Other tokenizer kinds are refused."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        model = spec.get("model", {})
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
            raise ModelError(
                "GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 model); this one is "
                f"{model.get('type')} without a byte-level pre-tokenizer",
                fix="export safetensors or ONNX for this model",
            )
        special = {t["content"]: t for t in spec.get("added_tokens", [])}
        tokens, types = [], []
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        for i in range(vocab_size):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(UNUSED)
                continue
            tokens.append(token)
            added = special.get(token)
            types.append(NORMAL if added is None else CONTROL if added.get("special") else USER_DEFINED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer. llama.cpp recognises a checkpoint's pre-tokenizer by hashing how it
    tokenizes a test text (in `convert_hf_to_gguf.py`), which needs its tables; without them we write `default`
    (GPT-2's split) and say so. A model loaded from a GGUF file keeps its own (`copy_tokenizer`)."""
    log.warning(
        "gguf: tokenizer.ggml.pre written as 'default' (llama.cpp's GPT-2 split); if llama.cpp tokenizes this "
        "model's text differently from transformers, convert the source with llama.cpp's convert_hf_to_gguf.py "
        "and compress from that GGUF file, whose tokenizer the export keeps"
    )
    return "default"


def copy_tokenizer(writer: gguf.GGUFWriter, source_gguf: Path) -> None:
    """Every `tokenizer.*` field of the GGUF file the model was loaded from, as it is (llama.cpp's own
    pre-tokenizer name, merges, special ids and chat template)."""
    reader = gguf.GGUFReader(source_gguf)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
