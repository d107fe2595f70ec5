"""Deployment targets of a bit allocation: the weight formats each runtime runs natively (with a fast kernel).

A layer-wise mix is only worth its size if the runtime that serves it has a kernel for every format in it: a layer
that falls back to dequantizing its whole weight on every call makes the artifact slower than the float model.
`allocate_bits.target` names the runtime; a candidate outside its set is refused when the recipe is read.

What each runtime takes (as of 2026-12):
- compressor: `compressor.load`'s C++ kernels: INT2/3/4/8 in any group size, channel or tensor scales, symmetric or
  asymmetric; FP8 E4M3 per tensor, channel or block.
- vllm: compressed-tensors weight-only kernels (Marlin/Machete, `CompressedTensorsWNA16`): INT4 and INT8 in groups
  of 32, 64 or 128 or per channel; zero points for INT4 only; FP8 weight-only (`W8A16Fp8`) per tensor or channel.
- onnxruntime: MatMulNBits: INT2/4/8 in power-of-two blocks of at least 16 (channel scales map onto blocks when
  the input width has such a factor), symmetric or asymmetric. No FP8 kernel on CPU (FP8 QDQ dequantizes).
- llama.cpp: the GGUF types that hold our formats exactly: Q4_0 (INT4 g32 symmetric, code offset 8), Q4_1 (INT4
  g32 with a minimum) and Q8_0 (INT8 g32 symmetric). K-quants have quantized sub-scales of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .quantize import WeightScheme

TARGET_NAMES = ("compressor", "vllm", "onnxruntime", "llama.cpp")


def _power_of_two_at_least_16(group: int | None) -> bool:
    return group is not None and group >= 16 and group & (group - 1) == 0


def _runs_on_compressor(s: WeightScheme) -> bool:
    return True  # every format the quantize pass writes has a kernel in csrc/


def _runs_on_vllm(s: WeightScheme) -> bool:
    if s.format == "fp8":
        return s.strategy in ("tensor", "channel")
    if s.bits not in (4, 8) or (not s.symmetric and s.bits != 4):
        return False
    return s.strategy == "channel" or (s.strategy == "group" and s.group_size in (32, 64, 128))


def _runs_on_onnxruntime(s: WeightScheme) -> bool:
    if s.format == "fp8" or s.bits not in (2, 4, 8):
        return False
    return s.strategy == "channel" or (s.strategy == "group" and _power_of_two_at_least_16(s.group_size))


def _runs_on_llama_cpp(s: WeightScheme) -> bool:
    if s.format == "fp8" or s.strategy != "group" or s.group_size != 32:
        return False
    return s.bits == 4 or (s.bits == 8 and s.symmetric)


@dataclass(frozen=True)
class RuntimeTarget:
    """A runtime an allocation is made for: which candidate formats it runs natively, in words and as a test."""

    name: str
    runs: Callable[[WeightScheme], bool]
    formats: str  # what it takes, for messages and the README

    def refusal(self, candidate: str, scheme: WeightScheme | None) -> str | None:
        """Why `candidate` cannot be allocated for this target, or None when it can ('keep' always can)."""
        if scheme is None or self.runs(scheme):
            return None
        return (
            f"candidate {candidate!r} has no fast kernel on target {self.name}, which takes {self.formats}; "
            f"drop the candidate or set allocate_bits.target (one of {', '.join(TARGET_NAMES)})"
        )


TARGETS = {
    t.name: t
    for t in (
        RuntimeTarget(
            "compressor",
            _runs_on_compressor,
            "int2/int3/int4/int8 in any group size, channel or tensor, sym or asym; fp8 tensor, channel or block",
        ),
        RuntimeTarget(
            "vllm",
            _runs_on_vllm,
            "int4 g32/g64/g128/channel (sym or asym), int8 g32/g64/g128/channel (sym), fp8 tensor or channel",
        ),
        RuntimeTarget(
            "onnxruntime",
            _runs_on_onnxruntime,
            "int2/int4/int8 in power-of-two groups >= 16 or channel, sym or asym (MatMulNBits); no fp8",
        ),
        RuntimeTarget("llama.cpp", _runs_on_llama_cpp, "int4 g32 sym (Q4_0) or asym (Q4_1), int8 g32 sym (Q8_0)"),
    )
}


def implied_target(exports: list[str]) -> str:
    """The target a recipe's exports imply: onnxruntime when it writes ONNX, else compressor's own kernels."""
    return "onnxruntime" if "onnx" in exports else "compressor"
