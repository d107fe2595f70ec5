"""Weight format descriptions and their storage cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# the dtypes scales may be stored in (a recipe's `scale_dtype`), and their width
SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCALE_BITS: dict[str, int] = {name: torch.finfo(dtype).bits for name, dtype in SCALE_DTYPES.items()}


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """`scale` rounded to the storage dtype named `scale_dtype` (a SCALE_DTYPES key), returned as float32."""
    return scale.to(SCALE_DTYPES[scale_dtype]).to(torch.float32)


@dataclass(frozen=True)
class IntFormat:
    """Integer weights with per-group / per-channel scales; q in [-2^(b-1), 2^(b-1)-1], w = (q - zp) * scale."""

    bits: int
    group_size: int | None  # None: one group per output channel (channel-wise)
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    @property
    def label(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"

    def storage_bits(self, out_features: int, in_features: int, scale_dtype: str) -> int:
        """Total bits for weights + scales + zero points of one [out, in] matrix."""
        groups = out_features * self.num_groups(in_features)
        bits = out_features * in_features * self.bits + groups * SCALE_BITS[scale_dtype]
        if not self.symmetric:
            bits += groups * self.bits
        return bits


@dataclass(frozen=True)
class Fp8Format:
    """FP8 E4M3 weights with float32 scales per tensor, per output channel, or per 2-D block."""

    strategy: str  # tensor | channel | block
    block: tuple[int, int] = (128, 128)

    @classmethod
    def of_scheme(cls, scheme: dict) -> Fp8Format:
        """The format of a compressed-tensors FP8 weight scheme (2-D blocks default to 128 x 128)."""
        return cls(scheme["strategy"], tuple(scheme.get("block_structure") or (128, 128)))

    @property
    def label(self) -> str:
        s = f"block{self.block[0]}x{self.block[1]}" if self.strategy == "block" else self.strategy
        return f"fp8-e4m3-{s}"

    def storage_bits(self, out_features: int, in_features: int, scale_dtype: str = "float32") -> int:
        if self.strategy == "tensor":
            n_scales = 1
        elif self.strategy == "channel":
            n_scales = out_features
        else:
            n_scales = math.ceil(out_features / self.block[0]) * math.ceil(in_features / self.block[1])
        return out_features * in_features * 8 + n_scales * 32


WeightFormatT = IntFormat | Fp8Format


def fallback_group_size(in_features: int, group_size: int) -> int | None:
    """Largest power of two >= 16 and <= group_size dividing in_features; None means channel-wise.

    compressed-tensors (and hence transformers/vLLM) requires group sizes that divide the input width, so
    this is the documented per-layer policy when the recipe's group size does not.
    """
    g = 1 << int(math.floor(math.log2(group_size)))
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def resolve_format(scheme, in_features: int, group_policy: str = "fallback") -> tuple[WeightFormatT, str | None]:
    """The concrete format of a recipe WeightScheme for a layer of this input width, and a note if it fell back.

    `group_policy` 'fallback' replaces a group size that does not divide the width (see `fallback_group_size`);
    'ragged' keeps it (a short last group, runnable by compressor.load only).
    """
    if scheme.format == "fp8":
        return Fp8Format(scheme.strategy, tuple(scheme.block_size)), None
    if scheme.strategy == "channel":
        return IntFormat(scheme.bits, None, scheme.symmetric), None
    if scheme.strategy == "tensor":
        raise NotImplementedError("int per-tensor scales")  # rejected by the recipe schema
    g = scheme.group_size
    if in_features % g == 0 or group_policy == "ragged":
        return IntFormat(scheme.bits, g, scheme.symmetric), None
    fb = fallback_group_size(in_features, g)
    note = f"group_size {g} does not divide in_features {in_features}; " + (
        f"fell back to group_size {fb}" if fb else "fell back to channel-wise scales"
    )
    return IntFormat(scheme.bits, fb, scheme.symmetric), note
