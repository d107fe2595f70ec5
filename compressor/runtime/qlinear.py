"""QuantLinear / QuantEmbedding: layers that keep their weight compressed (packed INT or FP8), dequantized on use."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.formats import Fp8Format
from ..quant.fp8 import fp8_dequantize
from .ops import dequantize_packed, int_weight_matmul


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as compressed-tensors tensors (pack-quantized INT or FP8 E4M3)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, scheme: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, scheme: dict) -> QuantLinear:
        """Build from one layer's tensors ('weight_packed', 'weight_scale', ...), keys without the prefix."""
        if scheme["type"] == "float":
            out_f, in_f = tensors["weight"].shape
        else:
            out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
        mod = cls(in_f, out_f, bias, scheme)
        for key, t in tensors.items():
            mod.register_buffer(key, t.clone())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        s = self.scheme
        if s["type"] == "float":
            fmt = Fp8Format(s["strategy"], tuple(s.get("block_structure") or (128, 128)))
            return fp8_dequantize(self.weight, self.weight_scale, fmt)
        group = s.get("group_size") or self.in_features
        if s["strategy"] == "channel":
            group = self.in_features
        return dequantize_packed(
            self.weight_packed,
            self.weight_scale,
            getattr(self, "weight_zero_point", None),
            s["num_bits"],
            (self.out_features, self.in_features),
            group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_weight_matmul(x, self.dequantized_weight(), self.bias)


class QuantEmbedding(QuantLinear):
    """An embedding table [vocab, hidden] stored like a quantized linear weight; rows gathered after dequantizing.

    `scale` multiplies the looked-up rows (Gemma's scaled embeddings).
    """

    def __init__(self, in_features, out_features, bias, scheme, padding_idx=None, scale: float | None = None):
        super().__init__(in_features, out_features, bias, scheme)
        self.padding_idx, self.embed_scale = padding_idx, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.embedding(ids, self.dequantized_weight(), self.padding_idx)
        return out if self.embed_scale is None else out * self.embed_scale

    def extra_repr(self) -> str:
        s = self.scheme
        return f"in={self.in_features}, out={self.out_features}, {s['type']}{s['num_bits']} {s['strategy']}"
