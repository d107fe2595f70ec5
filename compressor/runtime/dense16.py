"""Linear16 / Embedding16: float layers that keep an artifact's bfloat16 / float16 weight as it is stored.

Artifacts store their unquantized tensors in 16 bits (recipe `dtype`). Upcast to a float32 model, a float lm_head
reads twice the bytes per decoded token (SmolLM2's 49152 x 576 head: 113 MB in float32, 57 MB stored). A
`Linear16` keeps the 16-bit tensor and, on CPU, runs the extension's `dense16_gemm`: each weight widened exactly to
float32 and the products summed in float32, so the outputs are those of the float32 model to summation-order
rounding. A tied output embedding (`TiedLinear16`) reads the table of the input `Embedding16`: one 16-bit copy for
both. Without the extension (or on a GPU) they run torch's matmul on the weight cast to the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._ext import dense_kernels_for
from .moves import apply_to_buffers_device_only
from .ops import dense16_matmul

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


class Linear16(nn.Module):
    """y = x W^T + b with W [out, in] kept in its 16-bit storage dtype (the buffer `weight`; no float32 copy).

    Returns x's dtype. `.to(dtype)` / `.half()` convert the bias only; the weight keeps its dtype and only moves
    to the new device (as a QuantLinear's compressed tensors do). `use_kernels = False` forces the torch path.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight.dtype not in SIXTEEN_BIT or weight.dim() != 2:
            raise ValueError(f"Linear16 takes a 2-D bfloat16 or float16 weight, got {weight.dtype} {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.weight, self.bias
        if self.use_kernels and dense_kernels_for(w.device):
            y = dense16_matmul(x.reshape(-1, self.in_features), w, bias)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        return apply_to_buffers_device_only(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {str(self.weight.dtype).removeprefix('torch.')}"


class Embedding16(nn.Module):
    """An embedding table kept in its 16-bit storage dtype; looked-up rows are widened exactly.

    Rows come out in `dtype`, the dtype an nn.Embedding of the model would have: set by `compressor.load(dtype=...)`
    and changed like one by `.to(dtype)` / `.half()` (the table itself keeps its dtype, as in QuantEmbedding).
    `embed_scale` multiplies the rows (Gemma's scaled embeddings).
    """

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, embed_scale: float | None = None):
        super().__init__()
        if weight.dtype not in SIXTEEN_BIT or weight.dim() != 2:
            raise ValueError(f"Embedding16 takes a 2-D bfloat16 or float16 table, got {weight.dtype} {weight.shape}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.padding_idx, self.embed_scale = padding_idx, embed_scale
        self.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32)
        return (rows if self.embed_scale is None else rows * self.embed_scale).to(self.dtype)

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # what the conversion does to a float tensor
        return apply_to_buffers_device_only(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        table = str(self.weight.dtype).removeprefix("torch.")
        return f"{self.num_embeddings}, {self.embedding_dim}, {table} table, rows in {self.dtype}"


class TiedLinear16(Linear16):
    """A Linear16 whose weight is an Embedding16's table (tied input and output embeddings): the table is read in
    place, so it exists once and moves with the embedding, which owns it (this module has no tensor of its own
    but its bias)."""

    def __init__(self, embedding: Embedding16, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: the model reaches it elsewhere
        self.out_features, self.in_features = embedding.weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernels = True

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight
