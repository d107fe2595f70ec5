"""Trace a (swapped) transformers model into ONNX: decoder with KV cache or encoder, then finalize the file.

Decoder I/O follows optimum's `ORTModelForCausalLM`: inputs `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim]; outputs `logits`, `present.{i}.key/value`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compressor.models.adapters import adapter_for

from .initializers import InitializerStore
from .ops import TRANSLATIONS

log = logging.getLogger(__name__)

IR_VERSION = 10  # opset 21's IR; onnxruntime 1.22..1.32 all read it (onnx 1.23 would write 12 otherwise)
# above this the weights go to `model.onnx.data` (protobuf caps a file at 2 GB; a smaller limit keeps what an export
# holds in memory at the end, when a graph is serialized with its weights, small)
EXTERNAL_DATA_BYTES = 256 * 2**20


@dataclass(frozen=True)
class KvSpec:
    """Shape of one layer's cache tensors (heads and head dim; the sequence axis is dynamic)."""

    layers: int
    kv_heads: int
    head_dim: int


def kv_spec(config) -> KvSpec:
    """Cache geometry of a decoder config, read in its family's spelling (the adapter's `cache_geometry`)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return KvSpec(*adapter_for(cfg.model_type).cache_geometry(cfg))


class DecoderWithCache(nn.Module):
    """Flat tensors in, flat tensors out: rebuilds a DynamicCache from `past` and returns the presents.

    Every layer keeps its full past, sliding-window layers included (gemma3, mistral): the window is applied by the
    attention mask. transformers' sliding cache layers decide their mask sizes with Python ints, which tracing would
    freeze at the example's length.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()  # full-length layers: sliding windows are applied by the mask
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


class Encoder(nn.Module):
    """last_hidden_state (and pooler_output where the model has a pooler)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.pooled = getattr(model, "pooler", None) is not None

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return (out.last_hidden_state, out.pooler_output) if self.pooled else (out.last_hidden_state,)


def decoder_io(spec: KvSpec) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{t}" for i in range(spec.layers) for t in ("key", "value")]
    return (
        ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
        ["logits"] + [f"present.{n}" for n in kv],
    )


def export_decoder(model: nn.Module, opset: int) -> onnx.ModelProto:
    """Trace a causal LM with a KV cache; dynamic batch, sequence and past axes (past may be empty)."""
    from torch.export import Dim

    spec = kv_spec(model.config)
    b, s, p, t = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    batch, seq, past_len = 2, 3, 4  # sizes >= 2 so no axis is specialized while tracing
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [
        tuple(torch.zeros(batch, spec.kv_heads, past_len, spec.head_dim) for _ in range(2)) for _ in range(spec.layers)
    ]
    shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(spec.layers)],
    }
    inputs, outputs = decoder_io(spec)
    return _export(DecoderWithCache(model), (ids, mask, pos, past), shapes, inputs, outputs, opset)


def export_encoder(model: nn.Module, opset: int) -> onnx.ModelProto:
    """Trace a bert-style encoder (its base model); dynamic batch and sequence axes."""
    from torch.export import Dim

    b, s = Dim("batch"), Dim("sequence_length")
    ids = torch.zeros(2, 5, dtype=torch.long)
    wrapper = Encoder(model)
    outputs = ["last_hidden_state"] + (["pooler_output"] if wrapper.pooled else [])
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "token_type_ids": {0: b, 1: s}}
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    return _export(wrapper, args, shapes, list(shapes), outputs, opset)


def _export(wrapper, args, shapes, inputs, outputs, opset) -> onnx.ModelProto:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper.eval(),
            args,
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            dynamo=True,
            custom_translation_table=TRANSLATIONS,
            verbose=False,
        )
    return program.model_proto


def int4_initializer(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """int8 codes in [-8, 7] as a packed INT4 initializer (first element in the low nibble)."""
    codes = codes.astype(np.int8)
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ValueError(f"{name}: codes outside int4")
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = flat.view(np.uint8) & 0x0F
    packed = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=codes.shape)
    packed.raw_data = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return packed


def is_int4_codes(name: str) -> bool:
    """`*.qdq_int4_*` initializers hold int8 codes that are stored as INT4."""
    return ".qdq_int4_" in name


def retype_int4(model: onnx.ModelProto) -> None:
    """Store `*.qdq_int4_*` initializers (int8 codes in [-8, 7]) as packed INT4 tensors (those not yet INT4)."""
    for i, init in enumerate(model.graph.initializer):
        if not is_int4_codes(init.name) or init.data_type == onnx.TensorProto.INT4:
            continue
        packed = int4_initializer(init.name, onnx.numpy_helper.to_array(init))
        model.graph.initializer[i].CopyFrom(packed)
    for vi in list(model.graph.value_info):
        if ".qdq_int4_" in vi.name:
            model.graph.value_info.remove(vi)


def finalize(model: onnx.ModelProto, path: Path, store: InitializerStore | None = None) -> list[str]:
    """Set IR version, save (external data above EXTERNAL_DATA_BYTES), run onnx.checker on the file; returns files
    written. With `store`, the initializers were written to its data file as the graph was built: the data stays
    there (large models) or is put back inline."""
    model.ir_version = IR_VERSION
    for node in model.graph.node:  # tracing metadata: local source paths and stack traces, not for users
        del node.metadata_props[:]
    data_name = path.name + ".data"
    if store is not None:
        store.close()
        external = store.size > EXTERNAL_DATA_BYTES
        if not external:
            store.inline(list(model.graph.initializer))
        onnx.save_model(model, str(path))  # the tensors already point into the data file
    else:
        size = sum(len(t.raw_data) for t in model.graph.initializer)
        external = size > EXTERNAL_DATA_BYTES
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    onnx.checker.check_model(str(path), full_check=False)
    return [path.name, data_name] if external else [path.name]
