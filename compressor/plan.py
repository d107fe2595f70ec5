"""The plan: the single source of truth for what each layer became. Exporters read only this."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .quant.formats import Fp8Format, IntFormat
from .quant.fp8 import fp8_dequantize
from .quant.lowrank import LowRankFactors
from .quant.packing import pack_int32, unpack_int32
from .quant.rtn import dequantize


class QuantizedWeight:
    """Quantized tensors of one linear, in [out_features, in_features] orientation.

    `codes` are int8 codes (int formats) or float8_e4m3fn weights (fp8). Once `compact()` ran (the plan does it
    when a layer is recorded), INT codes of fewer than 8 bits are held packed into int32 words, exactly as the
    artifact stores them (`packed`), and `codes` unpacks on access: a plan of a large model stays small.
    """

    def __init__(
        self,
        fmt: IntFormat | Fp8Format,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None = None,
        scale_dtype: str = "float32",
    ):
        self.fmt, self.scale, self.zero, self.scale_dtype = fmt, scale, zero, scale_dtype
        self.shape = tuple(codes.shape)
        self._codes: torch.Tensor | None = codes
        self.packed: torch.Tensor | None = None

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is not None:
            return self._codes
        return unpack_int32(self.packed, self.fmt.bits, self.shape[1])

    def compact(self) -> None:
        """Keep sub-byte INT codes packed (compressed-tensors int32 words) instead of one int8 per weight."""
        if self._codes is not None and isinstance(self.fmt, IntFormat) and self.fmt.bits < 8:
            self.packed = pack_int32(self._codes, self.fmt.bits)
            self._codes = None

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weight these tensors stand for."""
        if isinstance(self.fmt, Fp8Format):
            return fp8_dequantize(self.codes, self.scale, self.fmt)
        return dequantize(self.codes, self.scale, self.zero, self.fmt.effective_group(self.shape[1]))


@dataclass
class LayerPlan:
    """What one linear became."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    format: str  # label, e.g. int4-g64-sym, fp8-e4m3-channel
    method: str  # rtn | gptq
    bits: int
    group_size: int | None
    requested_group_size: int | None
    symmetric: bool
    strategy: str
    scale_dtype: str
    storage_bits: int  # the quantized tensors: codes, scales, zero points
    note: str | None = None
    compensation_rank: int | None = None  # rank of the low-rank correction of its quantization error, if any
    compensation_bits: int = 0  # that correction's factors at the artifact's float dtype

    @classmethod
    def describe(
        cls, name: str, qw: QuantizedWeight, method: str, requested_group_size: int | None, note: str | None
    ) -> LayerPlan:
        """The plan entry for a layer quantized into `qw`."""
        fmt = qw.fmt
        out_f, in_f = qw.shape
        if isinstance(fmt, IntFormat):
            bits, group, sym = fmt.bits, fmt.group_size, fmt.symmetric
            strategy = "group" if fmt.group_size else "channel"
        else:
            bits, group, sym, strategy = 8, None, True, fmt.strategy
        return cls(
            name=name,
            shape=(out_f, in_f),
            format=fmt.label,
            method=method,
            bits=bits,
            group_size=group,
            requested_group_size=requested_group_size,
            symmetric=sym,
            strategy=strategy,
            scale_dtype=qw.scale_dtype,
            storage_bits=fmt.storage_bits(out_f, in_f, qw.scale_dtype),
            note=note,
        )

    @property
    def total_bits(self) -> int:
        return self.storage_bits + self.compensation_bits

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / (self.shape[0] * self.shape[1])


@dataclass
class Plan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    # low-rank corrections of quantization error (the `lowrank` pass), exported as a PEFT LoRA adapter
    compensations: dict[str, LowRankFactors] = field(default_factory=dict)

    def record(self, layer: LayerPlan, weight: QuantizedWeight, compensation: LowRankFactors | None = None) -> None:
        weight.compact()
        self.layers[layer.name] = layer
        self.weights[layer.name] = weight
        if compensation is not None:
            self.compensations[layer.name] = compensation
        else:
            self.compensations.pop(layer.name, None)

    def effective_weight(self, name: str) -> torch.Tensor:
        """The float32 [out, in] weight the layer computes with: dequantized, plus its correction if it has one."""
        w = self.weights[name].dequantize()
        comp = self.compensations.get(name)
        return w if comp is None else w + comp.delta()

    def to_json(self) -> dict:
        return {name: asdict(lp) for name, lp in self.layers.items()}  # execution order
