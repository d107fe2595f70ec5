"""GGUF block types written exactly from our codes: which of our formats is which llama.cpp type, and the packing.

- Q8_0: blocks of 32 weights along the input, one float16 scale d, int8 codes: w = d q. Our INT8 g32 symmetric
  with float16 scales is exactly this (codes in [-128, 127]).
- Q4_0: blocks of 32, float16 d, 4-bit u in [0, 15]: w = d (u - 8). Our INT4 g32 symmetric with float16 scales
  (code q in [-8, 7], u = q + 8), whose scale rule is the type's own: the largest-magnitude weight / -8.

Q4_1 (w = d u + m with a float16 minimum) is not ours: our asymmetric zero points are integers, and m = -d (z + 8)
rounds in float16, so it is refused rather than written approximately. Pure numpy/torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .formats import IntFormat

GGUF_BLOCK = 32


@dataclass(frozen=True)
class GgufType:
    """A GGUF block type our codes map onto exactly: its name (gguf.GGMLQuantizationType member) and format."""

    name: str
    fmt: IntFormat


GGUF_TYPES = (GgufType("Q8_0", IntFormat(8, GGUF_BLOCK, True)), GgufType("Q4_0", IntFormat(4, GGUF_BLOCK, True)))


def gguf_type_for(fmt, scale_dtype: str) -> str | None:
    """The GGUF type a layer of format `fmt` with `scale_dtype` scales is written as exactly, None if none is."""
    if scale_dtype != "float16":
        return None
    return next((t.name for t in GGUF_TYPES if t.fmt == fmt), None)


def why_not_gguf(fmt, scale_dtype: str) -> str:
    """One line: why a layer format has no exact GGUF type, and the recipe change that gives one."""
    label = getattr(fmt, "label", str(fmt))
    return (
        f"{label} with {scale_dtype} scales has no exact GGUF type (GGUF writes Q8_0 = int8 g32 symmetric and Q4_0 = "
        "int4 g32 symmetric, both with float16 scales); quantize with weights {bits: 4 or 8, group_size: 32, "
        "symmetric: true} and scale_dtype: float16, or leave the layer float"
    )


def pack_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """[out, in] int8 codes and [out, in / 32] scales -> Q8_0 bytes [out, in / 32 * 34] (d, then 32 int8)."""
    out, blocks = _blocks(codes, scale)
    d = scale.to(torch.float16).numpy().reshape(out, blocks, 1).view(np.uint8)
    q = codes.to(torch.int8).numpy().reshape(out, blocks, GGUF_BLOCK).view(np.uint8)
    return np.concatenate([d, q], axis=2).reshape(out, -1)


def pack_q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """[out, in] int8 codes in [-8, 7] and [out, in / 32] scales -> Q4_0 bytes [out, in / 32 * 18]: d, then 16
    bytes whose low nibbles are weights 0-15 of the block and high nibbles weights 16-31 (u = q + 8)."""
    out, blocks = _blocks(codes, scale)
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise ValueError("Q4_0 codes must lie in [-8, 7]")
    d = scale.to(torch.float16).numpy().reshape(out, blocks, 1).view(np.uint8)
    u = (codes.to(torch.int16) + 8).numpy().astype(np.uint8).reshape(out, blocks, GGUF_BLOCK)
    qs = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([d, qs], axis=2).reshape(out, -1)


PACKERS = {"Q8_0": pack_q8_0, "Q4_0": pack_q4_0}


def _blocks(codes: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    out, width = codes.shape
    if width % GGUF_BLOCK:
        raise ValueError(f"GGUF blocks are {GGUF_BLOCK} wide; the input width {width} is not a multiple")
    blocks = width // GGUF_BLOCK
    if tuple(scale.shape) != (out, blocks):
        raise ValueError(f"expected scales [{out}, {blocks}], got {list(scale.shape)}")
    return out, blocks
