"""A fused decoder graph for llama-style models (llama, mistral, qwen2), written node by node.

The traced graph (`graph.py`) spends most of a decode step outside the matmuls: transformers' mask and position
computations, rotary embeddings, the cache concatenation, repeat_kv and attention come out as a few hundred small
operators per step. Here each block is

    SkipSimplifiedLayerNormalization -> MatMulNBits(q|k|v) -> GroupQueryAttention(packed QKV, rotary, cache)
    -> MatMulNBits(o) -> SkipSimplifiedLayerNormalization -> MatMulNBits(gate|up) -> Split -> SiLU * up
    -> MatMulNBits(down)

with the same inputs and outputs as the traced graph (optimum's names; past/present [batch, kv_heads, seq,
head_dim]). Linears that share their input and their format (q/k/v, gate/up) are one MatMulNBits whose weight,
scales, zero points and bias are the members' tensors concatenated along N: the codes and scales are still the
artifact's, row for row (`onnx_export.json` says where each layer's rows are).

GroupQueryAttention takes its rotary positions and its causal mask from the attention mask (`seqlens_k` = valid
tokens - 1): exact for unpadded or right-padded batches, which is what `generate` with one prompt, or prompts of one
length, feeds. `position_ids` stays an input (optimum feeds it) but is implied by the mask; left-padded batches
need `graph: traced`.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor.calibration.engine import Residency
from compressor.models.adapters import FUSED_GRAPH_TYPES, adapter_for
from compressor.runtime.factored import A_NAME, B_NAME, FactoredLinear

from .graph import KvSpec, decoder_io, int4_initializer, is_int4_codes, kv_spec
from .initializers import InitializerStore
from .modules import OnnxQuantEmbedding, OnnxQuantLinear, Replacements

MS = "com.microsoft"


def fused_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot take the fused graph (None: it can); the family adapter says which model types may."""
    cfg = model.config
    if not adapter_for(cfg.model_type).fused_graph(cfg.model_type):
        return f"model type {cfg.model_type!r} (fused graph: {', '.join(FUSED_GRAPH_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        return f"rope type {rope.get('rope_type')!r} depends on the sequence length"
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", True)
    if window and uses_window and window < cfg.max_position_embeddings:
        return f"sliding window {window}"
    spec = kv_spec(cfg)
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None or model.get_output_embeddings() is None:
        return "no rotary embedding module or no lm_head"
    if spec.head_dim % 16:
        return f"head_dim {spec.head_dim} (GroupQueryAttention on CPU needs a multiple of 16)"
    return None


class _Graph:
    """Nodes and initializers of the graph being built; with a `store`, each initializer's data goes to the
    external data file as soon as it is made."""

    def __init__(self, store: InitializerStore | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.store = store
        self._count = 0

    def init(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float8_e4m3fn:
            proto = TensorProto(name=name, data_type=TensorProto.FLOAT8E4M3FN, dims=list(t.shape))
            proto.raw_data = t.contiguous().view(torch.uint8).numpy().tobytes()
        else:
            values = t.detach().contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if is_int4_codes(name):
                proto = int4_initializer(name, values)
            else:
                proto = numpy_helper.from_array(np.ascontiguousarray(values), name)
        self.inits.append(self.store.proto(proto) if self.store is not None else proto)
        return name

    def const(self, name: str, value, dtype=np.int64) -> str:
        return self.init(name, np.asarray(value, dtype=dtype))

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        self._count += 1
        name = name or f"{op}_{self._count}"
        outputs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs if n_out > 1 else outputs[0]

    def named(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self._count += 1
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{self._count}", domain=domain, **attrs))
        return outputs


def _nbits_key(m: nn.Module) -> tuple | None:
    """Members with equal keys can be one MatMulNBits (concatenated along N)."""
    if isinstance(m, OnnxQuantLinear) and m.block is not None:
        zp, corrected = m.nbits_zero_points is not None, m.correction_rank is not None
        return ("nbits", m.bits, m.block, m.in_features, m.accuracy_level, zp, corrected)
    if isinstance(m, nn.Linear):
        return ("float", m.in_features)
    return None


def _float_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = None if m.bias is None else m.bias.detach().to(torch.float32)
    return m.weight.detach().to(torch.float32), bias


class _Linears:
    """Emits linears (fused where members share input and format) and records where each layer's rows went."""

    def __init__(self, g: _Graph, modules: dict[str, nn.Module], replacements: Replacements):
        self.g, self.modules, self.replacements = g, modules, replacements
        self.placement: dict[str, dict] = {}

    def module(self, name: str) -> nn.Module:
        return self.replacements.get(name, self.modules[name])

    def group(self, x: str, names: list[str], fused_name: str) -> list[str] | str:
        """One output per member, or (when fusable) one output with the members' features concatenated."""
        mods = [self.module(n) for n in names]
        keys = {_nbits_key(m) for m in mods}
        if len(names) > 1 and len(keys) == 1 and None not in keys:
            return self._emit(x, names, mods, fused_name)
        return [self._emit(x, [n], [m], n) for n, m in zip(names, mods)]

    def one(self, x: str, name: str) -> str:
        return self._emit(x, [name], [self.module(name)], name)

    def _bias(self, mods: list[nn.Module], widths: list[int]) -> torch.Tensor | None:
        biases = [m.bias for m in mods]
        if all(b is None for b in biases):
            return None
        return torch.cat([torch.zeros(w) if b is None else b.detach().float() for b, w in zip(biases, widths)])

    def _emit(self, x: str, names: list[str], mods: list[nn.Module], tensor: str) -> str:
        if isinstance(mods[0], FactoredLinear):  # B (A x) + b: its two linears, each float or quantized
            return self.one(self.one(x, f"{names[0]}.{A_NAME}"), f"{names[0]}.{B_NAME}")
        y = self._matmul(x, names, mods, tensor)
        return self._correct(x, y, mods, f"model.{tensor}")

    def _correct(self, x: str, y: str, mods: list[nn.Module], prefix: str) -> str:
        """y + (x down^T) up^T for members with a low-rank correction (all of a fused group have one, or none):
        one MatMul into the members' concatenated ranks, then each member's up factor, concatenated."""
        if getattr(mods[0], "correction_rank", None) is None:
            return y
        g = self.g
        low = g.node("MatMul", [x, g.init(f"{prefix}.lora_down_t", torch.cat([m.lora_down_t for m in mods], 1))])
        if len(mods) == 1:
            return g.node("Add", [y, g.node("MatMul", [low, g.init(f"{prefix}.lora_up_t", mods[0].lora_up_t)])])
        ranks = g.const(f"{prefix}.lora_ranks", [m.correction_rank for m in mods])
        parts = g.node("Split", [low, ranks], n_out=len(mods), axis=-1)
        ups = [
            g.node("MatMul", [p, g.init(f"{prefix}.lora_up_t.{i}", m.lora_up_t)])
            for i, (p, m) in enumerate(zip(parts, mods))
        ]
        return g.node("Add", [y, g.node("Concat", ups, axis=-1)])

    def _matmul(self, x: str, names: list[str], mods: list[nn.Module], tensor: str) -> str:
        g, prefix = self.g, f"model.{tensor}"
        widths = [m.out_features for m in mods]
        offsets = np.cumsum([0, *widths]).tolist()
        first = mods[0]
        bias = self._bias(mods, widths)
        if isinstance(first, OnnxQuantLinear) and first.block is not None:
            b = g.init(f"{prefix}.nbits_weight", torch.cat([m.nbits_weight for m in mods]))
            s = g.init(f"{prefix}.nbits_scales", torch.cat([m.nbits_scales for m in mods]))
            zp = (
                ""
                if first.nbits_zero_points is None
                else g.init(f"{prefix}.nbits_zero_points", torch.cat([m.nbits_zero_points for m in mods]))
            )
            inputs = [x, b, s, zp, "", "" if bias is None else g.init(f"{prefix}.bias", bias)]
            while inputs[-1] == "":
                inputs.pop()
            attrs = dict(K=first.in_features, N=offsets[-1], bits=first.bits, block_size=first.block)
            out = g.node("MatMulNBits", inputs, domain=MS, accuracy_level=first.accuracy_level, **attrs)
            for n, lo, hi in zip(names, offsets, offsets[1:]):
                self.placement[n] = {"tensor": b, "rows": [lo, hi]}
            return out
        if isinstance(first, OnnxQuantLinear):  # DequantizeLinear + MatMul (one member)
            w, z = getattr(first, first.weight_name), getattr(first, first.zero_name)
            wname = g.init(f"{prefix}.{first.weight_name}", w)
            inputs = [wname, g.init(f"{prefix}.qdq_scale", first.qdq_scale)]
            if z is not None:
                inputs.append(g.init(f"{prefix}.{first.zero_name}", z))
            attrs = {"axis": first.axis} | ({"block_size": first.block_size} if first.block_size else {})
            weight = g.node("DequantizeLinear", inputs, **attrs)
            self.placement[names[0]] = {"tensor": wname, "rows": [0, widths[0]]}
        else:  # float: one [K, N] matrix
            w = torch.cat([_float_weight(m)[0] for m in mods]).t().contiguous()
            weight = g.init(f"{prefix}.weight_t", w)
        y = g.node("MatMul", [x, weight])
        return y if bias is None else g.node("Add", [y, g.init(f"{prefix}.bias", bias)])


def _rms_norm(g: _Graph, x: str, norm: nn.Module, name: str) -> str:
    """RMSNorm as the pattern onnxruntime fuses into SimplifiedLayerNormalization (used once, before block 0)."""
    x2 = g.node("Pow", [x, g.const("two", 2.0, np.float32)])
    mean = g.node("ReduceMean", [x2, g.const("last_axis", [-1])], keepdims=1)
    var = g.node("Add", [mean, g.const(f"{name}.eps", _eps(norm), np.float32)])
    normed = g.node("Div", [x, g.node("Sqrt", [var])])
    return g.node("Mul", [normed, g.init(f"{name}.weight", _norm_weight(norm))])


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach().to(torch.float32)


def _skip_norm(g: _Graph, x: str, residual: str, norm: nn.Module, name: str) -> tuple[str, str]:
    """(normed, x + residual) with one SkipSimplifiedLayerNormalization."""
    outs = [f"{name}/normed", f"{name}/unused_mean", f"{name}/unused_inv_std", f"{name}/sum"]
    g.named(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.init(f"{name}.weight", _norm_weight(norm))],
        outs,
        domain=MS,
        epsilon=_eps(norm),
    )
    return outs[0], outs[3]


def _rotary_caches(model: nn.Module, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim / 2] from the model's own rotary module (any position-independent type)."""
    rotary = model.base_model.rotary_emb
    positions = torch.arange(model.config.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0].float(), sin[0].float()
    half = head_dim // 2
    if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise ValueError("rotary embedding is not rotate-half style")
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def build_fused_decoder(
    model: nn.Module,
    replacements: Replacements,
    opset: int,
    store: InitializerStore | None = None,
    residency: Residency | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """The fused graph of a llama-style decoder; returns the model and each layer's placement (tensor, rows).

    Block by block: `residency` brings each block in (a streamed model) and lets it go once its nodes are built,
    the replacements of its layers are made then and dropped after, and with `store` every initializer is written
    out as it is made; so one block's weights are in memory at a time."""
    spec = kv_spec(model.config)
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    residency = residency or Residency()
    residency.load_outside()  # embeddings, final norm, head
    g = _Graph(store)
    lin = _Linears(g, modules, replacements)
    step = _step_inputs(g, model, spec)
    hidden = _embedding(g, lin, model, names)
    blocks = model.base_model.layers
    residual, down = hidden, None
    for i, block in enumerate(blocks):
        residency.load_block(i)
        norm, norm_name = block.input_layernorm, f"model.{names[id(block.input_layernorm)]}"
        if down is None:
            normed = _rms_norm(g, hidden, norm, norm_name)
        else:
            normed, residual = _skip_norm(g, down, residual, norm, norm_name)
        down, residual = _block(g, lin, model, spec, step, i, block, names[id(block)], normed, residual)
        replacements.drop(names[id(block)] + ".")
        residency.release_block(i)
    final = model.base_model.norm
    normed, residual = _skip_norm(g, down, residual, final, f"model.{names[id(final)]}")

    head_name = names[id(model.get_output_embeddings())]
    head = lin.module(head_name)
    logits = lin.one(normed, head_name)
    g.named("Identity", [logits], ["logits"])
    graph_inputs, graph_outputs = _graph_io(spec, head.out_features)
    graph = helper.make_graph(g.nodes, "decoder", graph_inputs, graph_outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    return proto, lin.placement


def _step_inputs(g: _Graph, model: nn.Module, spec: KvSpec) -> list[str]:
    """GroupQueryAttention's per-step inputs: seqlens_k and total length (from the mask), cos and sin caches."""
    valid = g.node("ReduceSum", ["attention_mask", g.const("axis1", [1])], keepdims=0)
    seqlens_k = g.node("Cast", [g.node("Sub", [valid, g.const("one", 1)])], to=TensorProto.INT32)
    total = g.node("Shape", ["attention_mask"], start=1, end=2)
    total = g.node("Cast", [g.node("Squeeze", [total, g.const("axis0", [0])])], to=TensorProto.INT32)
    cos, sin = _rotary_caches(model, spec.head_dim)
    return [seqlens_k, total, g.init("rotary.cos_cache", cos), g.init("rotary.sin_cache", sin)]


def _embedding(g: _Graph, lin: _Linears, model: nn.Module, names: dict[int, str]) -> str:
    """The looked-up hidden states: GatherBlockQuantized for a quantized table, else Gather."""
    embed = model.get_input_embeddings()
    embed_name = names[id(embed)]
    new = lin.replacements.get(embed_name, embed)
    if isinstance(new, OnnxQuantEmbedding):
        attrs = dict(bits=new.bits, block_size=new.block, gather_axis=0, quantize_axis=1)
        data = g.init(f"model.{embed_name}.gbq_data", new.gbq_data)
        scales = g.init(f"model.{embed_name}.gbq_scales", new.gbq_scales)
        hidden = g.node("GatherBlockQuantized", [data, "input_ids", scales], domain=MS, **attrs)
        lin.placement[embed_name] = {"tensor": data, "rows": [0, int(new.gbq_data.shape[0])]}
        return hidden
    table = new.emb.weight if hasattr(new, "emb") else new.weight
    return g.node("Gather", [g.init(f"model.{embed_name}.weight", table.detach().float()), "input_ids"])


def _block(
    g: _Graph,
    lin: _Linears,
    model: nn.Module,
    spec: KvSpec,
    step: list[str],
    i: int,
    block: nn.Module,
    p: str,
    normed: str,
    residual: str,
) -> tuple[str, str]:
    """Block `i` (module name `p`) up to its down projection; returns (down's output, the residual stream)."""
    qkv = lin.group(normed, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"{p}.self_attn.qkv_proj")
    q, k, v = (qkv, "", "") if isinstance(qkv, str) else qkv
    attn_out, _, _ = g.named(
        "GroupQueryAttention",
        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *step],
        [f"{p}.attn/out", f"present.{i}.key", f"present.{i}.value"],
        domain=MS,
        num_heads=model.config.num_attention_heads,
        kv_num_heads=spec.kv_heads,
        scale=float(block.self_attn.scaling),
        do_rotary=1,
        rotary_interleaved=0,
    )
    o = lin.one(attn_out, f"{p}.self_attn.o_proj")
    normed, residual = _skip_norm(g, o, residual, block.post_attention_layernorm, f"model.{p}.post_norm")
    gu = lin.group(normed, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
    if isinstance(gu, str):
        split = g.const(f"{p}.split", [model.config.intermediate_size] * 2)
        gate, up = g.node("Split", [gu, split], n_out=2, axis=-1)
    else:
        gate, up = gu
    act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
    return lin.one(act, f"{p}.mlp.down_proj"), residual


def _graph_io(spec: KvSpec, vocab: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The decoder's inputs and outputs (optimum's names; past/present [batch, kv_heads, seq, head_dim])."""
    inputs, outputs = decoder_io(spec)
    f32 = TensorProto.FLOAT
    kv = ["batch_size", spec.kv_heads, "past_sequence_length", spec.head_dim]
    present = ["batch_size", spec.kv_heads, "total_sequence_length", spec.head_dim]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ] + [helper.make_tensor_value_info(n, f32, kv) for n in inputs[3:]]
    graph_outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab])]
    graph_outputs += [helper.make_tensor_value_info(n, f32, present) for n in outputs[1:]]
    return graph_inputs, graph_outputs
