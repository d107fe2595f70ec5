"""QuantLinear / QuantEmbedding: layers that keep their weight compressed (packed INT or FP8).

QuantLinear runs the C++ extension's ops on a kernel-layout copy of the weight (repacked once: by
`compressor.load`, on first use otherwise, and again after a move to another device); every format we write (INT2,
INT3, INT4, INT8, FP8) has a kernel. Only without the extension (announced once in the log) does it dequantize the
whole weight and call matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.formats import Fp8Format
from ..quant.fp8 import expand_blocks, fp8_dequantize
from ..quant.packing import pack_zero_points, unpack_zero_points
from ._ext import kernels_for
from .moves import apply_to_buffers_device_only
from .ops import MODE_FLOAT, add_correction, dequantize_packed, int_weight_matmul, packed_matmul
from .repack import PackedWeight, repack_fp8, repack_int


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as compressed-tensors tensors (pack-quantized INT or FP8 E4M3)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, scheme: dict):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernels = True  # False: always the pure-torch path (dequantize + matmul)
        # MODE_FLOAT (default): float32 activations for every M, the logits of the dequantized model;
        # MODE_AUTO: int8 activations for M < 16 rows (decode); MODE_INT8: int8 activations for every M
        self.kernel_mode = MODE_FLOAT
        self._packed: PackedWeight | None = None
        self._packed_ready = False
        self.lora_down: nn.Parameter | None = None  # low-rank correction y += up (down x), see attach_correction
        self.lora_up: nn.Parameter | None = None
        self._siblings = None  # a SiblingGroup (runtime/siblings.py) this layer's kernel call is shared with
        self._sibling_index = 0

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
            return fp8_dequantize(self.weight, self.weight_scale, Fp8Format.of_scheme(s))
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

    def packed_weight(self) -> PackedWeight | None:
        """The kernel-layout weight (made on first call), or None when the extension cannot run this layer."""
        if not self._packed_ready:
            self._packed_ready = True
            device = (self.weight if self.scheme["type"] == "float" else self.weight_packed).device
            self._packed = self._repack() if kernels_for(device) else None
        return self._packed

    def _repack(self) -> PackedWeight | None:
        s = self.scheme
        if s["type"] == "float":
            fmt = Fp8Format.of_scheme(s)
            return repack_fp8(self.weight, self.weight_scale, fmt.strategy, fmt.block)
        return repack_int(
            self.weight_packed,
            self.weight_scale,
            getattr(self, "weight_zero_point", None),
            s["num_bits"],
            (self.out_features, self.in_features),
            self._int_group(),
        )

    def _int_group(self) -> int:
        """Columns per scale of an INT weight (the whole input for channel / tensor scales)."""
        s = self.scheme
        return self.in_features if s["strategy"] in ("channel", "tensor") else s.get("group_size") or self.in_features

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half() etc.: the bias converts as usual; the compressed tensors (the buffers: packed
        codes, FP8 weight, scales, zero points) only move to the new device, since casting them would change the
        format (an FP8 weight turned bfloat16) or round the scales. The kernel-layout copy is then remade from the
        moved tensors, at once if there was one (so that a torch.compile'd forward finds it made instead of
        tracing the repack)."""
        had_copy = self._packed_ready
        self._packed, self._packed_ready, self._siblings = None, False, None  # (a moved layer runs alone)
        out = apply_to_buffers_device_only(self, super()._apply, fn, recurse)
        if had_copy:
            self.packed_weight()
        return out

    def attach_correction(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Add a low-rank correction of the quantization error: y = W_q x + b + up @ (down @ x)."""
        if down.shape[1] != self.in_features or up.shape[0] != self.out_features or up.shape[1] != down.shape[0]:
            shapes = f"{tuple(down.shape)}, {tuple(up.shape)}"
            raise ValueError(f"correction factors {shapes} do not fit a {self.in_features}->{self.out_features} linear")
        self.lora_down = nn.Parameter(down.detach().clone(), requires_grad=False)
        self.lora_up = nn.Parameter(up.detach().to(down.dtype).clone(), requires_grad=False)

    def join_siblings(self, group, index: int, view: PackedWeight) -> None:
        """Share kernel calls with the linears of `group` (eager mode); `view` becomes this layer's kernel weight."""
        self._siblings, self._sibling_index = group, index
        self._packed, self._packed_ready = view, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_weight() if self.use_kernels else None
        if packed is None:  # the pure-torch path
            y = int_weight_matmul(x, self.dequantized_weight(), self.bias)
            if self.lora_down is None:
                return y
            low = x.to(self.lora_down.dtype) @ self.lora_down.t()
            return y + (low @ self.lora_up.t()).to(y.dtype)
        x2d = x.reshape(-1, self.in_features)
        low = None
        if self._siblings is not None and not torch.compiler.is_compiling():
            y, low = self._siblings.output(self._sibling_index, x, self.kernel_mode)
            if self._siblings.down_sources[self._sibling_index] is not self.lora_down:  # changed since joining
                low = None
        else:
            y = packed_matmul(x2d, packed, self.kernel_mode)
        if self.lora_down is not None:
            if low is None:
                low = x2d.to(self.lora_down.dtype) @ self.lora_down.t()
            y = add_correction(y, low, self.lora_up)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.contiguous().reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class QuantEmbedding(QuantLinear):
    """An embedding table [vocab, hidden] stored like a quantized linear weight; only looked-up rows are dequantized.

    `scale` multiplies the looked-up rows (Gemma's scaled embeddings). Rows come out in `dtype`, the dtype an
    nn.Embedding of the model would have: set by `compressor.load(dtype=...)`, and changed like one by
    `.to(dtype)` / `.half()` (the compressed table itself keeps its dtypes).
    """

    def __init__(self, in_features, out_features, bias, scheme, padding_idx=None, scale: float | None = None):
        super().__init__(in_features, out_features, bias, scheme)
        self.padding_idx, self.embed_scale = padding_idx, scale
        self.dtype = torch.float32

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # what the conversion does to a float tensor
        return super()._apply(fn, recurse)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 rows [len(rows), hidden] of the table (same values as dequantized_weight()[rows])."""
        s = self.scheme
        if s["type"] == "float":
            fmt = Fp8Format.of_scheme(s)
            scale = self.weight_scale
            if fmt.strategy == "block":  # the rows' block rows of scales: 1-row blocks
                scale = expand_blocks(scale, (self.out_features, scale.shape[1]), (fmt.block[0], 1))[rows]
                fmt = Fp8Format("block", (1, fmt.block[1]))
            elif fmt.strategy == "channel":
                scale = scale[rows]
            return fp8_dequantize(self.weight[rows], scale, fmt)
        bits = s["num_bits"]
        scale = self.weight_scale
        scale = scale.reshape(1, 1).expand(self.out_features, 1) if scale.numel() == 1 else scale
        zero = getattr(self, "weight_zero_point", None)
        if zero is not None:  # packed along the vocab: unpack all (small: [vocab, groups]), take the rows, repack
            zero = pack_zero_points(unpack_zero_points(zero, bits, self.out_features)[rows], bits)
        return dequantize_packed(
            self.weight_packed[rows], scale[rows], zero, bits, (len(rows), self.in_features), self._int_group()
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = self.dequantized_rows(flat).reshape(*ids.shape, self.in_features)
        return (out if self.embed_scale is None else out * self.embed_scale).to(self.dtype)

    def extra_repr(self) -> str:
        s = self.scheme
        return f"in={self.in_features}, out={self.out_features}, {s['type']}{s['num_bits']} {s['strategy']}"
