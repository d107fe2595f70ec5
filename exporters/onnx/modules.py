"""Modules that replace quantized layers for the duration of an ONNX export, and the swap itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .weights import LayerWeights, nbits_block_size, nbits_tensors, qdq_tensors


@dataclass
class LayerChoice:
    """How one layer is written: the ONNX operator, its block size, and why it differs from the request."""

    name: str
    op: str  # MatMulNBits | DequantizeLinear+MatMul | GatherBlockQuantized | Gather (float)
    weight_type: str  # uint4/uint8/... for MatMulNBits, int4/int8/float8e4m3fn for QDQ
    block_size: int | None
    note: str | None = None
    tensor: str | None = None  # the initializer holding its weight (fused linears share one)
    rows: list[int] | None = None  # [start, end) of its output rows (MatMulNBits) or columns (QDQ) in `tensor`
    accuracy_level: int | None = None  # MatMulNBits only
    correction_rank: int | None = None  # low-rank compensation: y += (x A^T) B^T, two float MatMuls


class OnnxQuantLinear(nn.Module):
    """y = x W^T + b through one of the ONNX quantized-matmul custom ops (buffers hold the ONNX tensors), plus
    (x down^T) up^T when the layer carries a low-rank correction of its quantization error."""

    def __init__(
        self,
        lw: LayerWeights,
        bias: torch.Tensor | None,
        fmt: str,
        accuracy_level: int,
        max_block: int | None = None,
        correction: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = lw.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone(), False)
        down, up = correction if correction is not None else (None, None)
        # [K, r] and [r, N]: MatMul's layout
        self.register_buffer("lora_down_t", None if down is None else down.detach().float().t().contiguous())
        self.register_buffer("lora_up_t", None if up is None else up.detach().float().t().contiguous())
        self.block = nbits_block_size(lw, max_block=max_block) if fmt == "matmulnbits" else None
        if self.block is not None:
            b, scales, zp = nbits_tensors(lw, self.block)
            self.register_buffer("nbits_weight", b)
            self.register_buffer("nbits_scales", scales)
            self.register_buffer("nbits_zero_points", zp)
            self.bits, self.accuracy_level = lw.bits, accuracy_level
            return
        t = qdq_tensors(lw)
        suffix = "int4" if t.onnx_int4 else "q"  # `.qdq_int4_*` initializers are re-typed to INT4 after export
        self.weight_name, self.zero_name = f"qdq_{suffix}_weight", f"qdq_{suffix}_zero"
        self.register_buffer(self.weight_name, t.weight)
        self.register_buffer("qdq_scale", t.scale)
        self.register_buffer(self.zero_name, t.zero)
        self.axis, self.block_size, self.onnx_int4 = t.axis, t.block_size, t.onnx_int4

    def choice(self, name: str, lw: LayerWeights, requested: str) -> LayerChoice:
        """What this layer became, with a note when the requested operator could not take it."""
        if self.block is not None:
            note = None
            if self.block != lw.group:
                what = "channel-wise scales" if lw.group == self.in_features else f"group {lw.group}"
                note = f"{what} written as MatMulNBits blocks of {self.block} (scales repeated, lossless)"
            level = self.accuracy_level
            return LayerChoice(name, "MatMulNBits", f"uint{self.bits}", self.block, note, accuracy_level=level)
        wtype = "float8e4m3fn" if lw.is_fp8 else ("int4" if self.onnx_int4 else "int8")
        note = None
        if requested == "matmulnbits" and not lw.is_fp8:
            note = (
                f"int{lw.bits} group {lw.group} of K={self.in_features} has no MatMulNBits block "
                "(needs bits 2/4/8 and a power-of-two block >= 16 dividing the group and K): written as QDQ"
            )
        return LayerChoice(name, "DequantizeLinear+MatMul", wtype, self.block_size or None, note)

    @property
    def correction_rank(self) -> int | None:
        return None if self.lora_down_t is None else int(self.lora_down_t.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._quantized(x)
        return y if self.lora_down_t is None else y + (x @ self.lora_down_t) @ self.lora_up_t

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            return ops.matmul_nbits(
                x,
                self.nbits_weight,
                self.nbits_scales,
                self.nbits_zero_points,
                self.bias,
                self.in_features,
                self.out_features,
                self.bits,
                self.block,
                self.accuracy_level,
            )
        w, z = getattr(self, self.weight_name), getattr(self, self.zero_name)
        return ops.dq_matmul(x, w, self.qdq_scale, z, self.bias, self.axis, self.block_size)


class OnnxQuantEmbedding(nn.Module):
    """Embedding rows gathered from a block-quantized table (`com.microsoft.GatherBlockQuantized`)."""

    def __init__(self, lw: LayerWeights, block: int, embed_scale: float | None):
        super().__init__()
        b, scales, _ = nbits_tensors(lw, block)
        self.register_buffer("gbq_data", b.reshape(b.shape[0], -1).contiguous())
        self.register_buffer("gbq_scales", scales)
        self.bits, self.block, self.hidden = lw.bits, block, lw.shape[1]
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = ops.gather_block_quantized(self.gbq_data, ids, self.gbq_scales, self.bits, self.block, self.hidden)
        return out if self.embed_scale is None else out * self.embed_scale


def embedding_module(lw: LayerWeights, embed_scale: float | None, quantized: bool) -> tuple[nn.Module, LayerChoice]:
    """GatherBlockQuantized for symmetric int 2/4/8 tables with a power-of-two block; a float Embedding otherwise."""
    block = nbits_block_size(lw)
    if quantized and block is not None and lw.zero is None:
        mod = OnnxQuantEmbedding(lw, block, embed_scale)
        return mod, LayerChoice("", "GatherBlockQuantized", f"uint{lw.bits}", block)
    emb = nn.Embedding.from_pretrained(lw.dequantize(), freeze=True)
    mod = _ScaledEmbedding(emb, embed_scale)
    note = "float table (dequantized) " + (
        "as requested" if not quantized else "(GatherBlockQuantized needs symmetric int 2/4/8, power-of-two block)"
    )
    return mod, LayerChoice("", "Gather (float)", "float32", None, note)


class _ScaledEmbedding(nn.Module):
    def __init__(self, emb: nn.Embedding, embed_scale: float | None):
        super().__init__()
        self.emb, self.embed_scale = emb, embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.emb(ids)
        return out if self.embed_scale is None else out * self.embed_scale


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily put `replacements` (full module name -> module) into `model`; restores the originals."""
    originals = {}
    try:
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals[name] = getattr(parent, child)
            setattr(parent, child, new)
        yield model
    finally:
        for name, old in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, old)


class Replacements:
    """The ONNX-op module of every quantized layer (name -> module), each made when first asked for: a graph built
    block by block makes a block's modules and `drop`s them after, so their tensors are not all held at once.
    `choices` records what each layer became, in the order of `layers`."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        embed: nn.Module | None,
        layers: dict[str, LayerWeights],
        cfg,
        corrections: dict[str, tuple[torch.Tensor, torch.Tensor]],
        progress=None,
    ):
        self.modules, self.embed, self.layers, self.cfg, self.corrections = modules, embed, layers, cfg, corrections
        self.progress = progress or (lambda text: None)
        missing = [n for n in layers if n not in modules]
        if missing:
            from compressor.errors import ModelError

            fix = "the artifact or plan is corrupt"
            raise ModelError(f"quantized layer '{missing[0]}' is not in the model", fix=fix)
        self._made: dict[str, nn.Module] = {}
        self._choices: dict[str, LayerChoice] = {}

    def names(self) -> list[str]:
        return list(self.layers)

    def linear_names(self) -> list[str]:
        """The quantized layers that become linears (not embedding tables)."""
        return [n for n in self.layers if not self._is_embedding(self.modules.get(n))]

    def get(self, name: str, default: nn.Module | None = None) -> nn.Module | None:
        if name not in self.layers:
            return default
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def all(self) -> dict[str, nn.Module]:
        """Every replacement (a traced graph swaps them all in at once)."""
        return {name: self.get(name) for name in self.layers}

    def drop(self, prefix: str) -> None:
        """Forget the made modules under `prefix` (their choices stay)."""
        for name in [n for n in self._made if n.startswith(prefix)]:
            del self._made[name]

    @property
    def choices(self) -> list[LayerChoice]:
        return [self._choices[n] for n in self.layers if n in self._choices]

    def _is_embedding(self, module: nn.Module | None) -> bool:
        return module is not None and (module is self.embed or isinstance(module, nn.Embedding))

    def _make(self, name: str) -> nn.Module:
        self.progress(f"layer {len(self._choices) + 1}/{len(self.layers)}")
        module, lw, cfg = self.modules[name], self.layers[name], self.cfg
        if self._is_embedding(module):
            scale = getattr(module, "embed_scale", None)
            scale = None if scale is None else float(scale)
            new, choice = embedding_module(lw, scale, quantized=cfg.embeddings == "quantized")
        else:
            bias = getattr(module, "bias", None)
            correction = self.corrections.get(name)
            new = OnnxQuantLinear(lw, bias, cfg.format, cfg.level_for(name), cfg.block_size_max, correction)
            choice = new.choice(name, lw, cfg.format)
            choice.correction_rank = new.correction_rank
        choice.name = name
        self._choices[name] = choice
        return new
