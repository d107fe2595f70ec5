"""The plan: every decision of a run as typed values. Passes write it; the artifact writers and the report read
only this (and the tensors), never the recipe or the passes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .quant.formats import Fp8Format, IntFormat, WeightFormatT
from .quant.fp8 import fp8_dequantize
from .quant.lowrank import LowRankFactors
from .quant.packing import pack_int32, unpack_int32
from .quant.rtn import dequantize
from .schema import LowRankPass, WeightScheme


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
    """What one linear became: its format as a typed value, and how it was solved."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    fmt: WeightFormatT
    method: str  # rtn | gptq
    scale_dtype: str
    requested_group_size: int | None  # the recipe's group size (differs from fmt's when it fell back)
    note: str | None = None
    compensation_rank: int | None = None  # rank of the low-rank correction of its quantization error, if any
    compensation_bits: int = 0  # that correction's factors at the artifact's float dtype

    @classmethod
    def describe(
        cls, name: str, qw: QuantizedWeight, method: str, requested_group_size: int | None, note: str | None
    ) -> LayerPlan:
        """The plan entry for a layer quantized into `qw`."""
        return cls(name, qw.shape, qw.fmt, method, qw.scale_dtype, requested_group_size, note)

    @property
    def format(self) -> str:
        """The format's label, e.g. int4-g64-sym, fp8-e4m3-channel."""
        return self.fmt.label

    @property
    def bits(self) -> int:
        return self.fmt.bits if isinstance(self.fmt, IntFormat) else 8

    @property
    def group_size(self) -> int | None:
        return self.fmt.group_size if isinstance(self.fmt, IntFormat) else None

    @property
    def symmetric(self) -> bool:
        return self.fmt.symmetric if isinstance(self.fmt, IntFormat) else True

    @property
    def strategy(self) -> str:
        """group | channel (int), tensor | channel | block (fp8): the compressed-tensors strategy."""
        if isinstance(self.fmt, Fp8Format):
            return self.fmt.strategy
        return "group" if self.fmt.group_size else "channel"

    @property
    def storage_bits(self) -> int:
        """The quantized tensors: codes, scales, zero points."""
        return self.fmt.storage_bits(self.shape[0], self.shape[1], self.scale_dtype)

    @property
    def total_bits(self) -> int:
        return self.storage_bits + self.compensation_bits

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / (self.shape[0] * self.shape[1])

    def to_json(self) -> dict:
        """The report's record of this layer (the format both as its label and as its parts)."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "format": self.format,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "requested_group_size": self.requested_group_size,
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "scale_dtype": self.scale_dtype,
            "storage_bits": self.storage_bits,
            "note": self.note,
            "compensation_rank": self.compensation_rank,
            "compensation_bits": self.compensation_bits,
            **({"block_structure": list(self.fmt.block)} if self.strategy == "block" else {}),
        }


@dataclass
class CompensationRequest:
    """The `lowrank` pass's decision: which layers get a low-rank correction of their quantization error, of which
    rank, fitted how; carried out by the quantize pass, which fits each factor once the layer is solved."""

    config: LowRankPass
    ranks: dict[str, int] | None = None  # per-layer ranks allocated under a budget (None: config.rank everywhere)

    def rank_for(self, name: str) -> int:
        """The rank of `name`'s correction (0: none)."""
        if not self.config.applies_to(name):
            return 0
        return self.config.rank if self.ranks is None else self.ranks.get(name, 0)


@dataclass(frozen=True)
class AwqFold:
    """Activation-aware scaling of one input group: columns of its linears times s, `folded_into` divided by s."""

    group: str  # the group's first linear
    alpha: float  # s = mean|x|^alpha (normalised)
    folded_into: str  # the norm or linear that produces the group's input


@dataclass(frozen=True)
class BlockChange:
    """What a structural pass did to the decoder blocks (indices at the time of the pass)."""

    pass_name: str  # remove_blocks | fuse_blocks
    depth_before: int
    depth_after: int
    removed_blocks: tuple[int, ...] = ()  # deleted (fuse_blocks: absorbed into the block before them)
    merged_windows: tuple[tuple[int, int], ...] = ()  # fuse_blocks: first and last block of each merge
    zeroed: tuple[str, ...] = ()  # branches whose output projection was zeroed (attention- / MLP-only removal)

    @classmethod
    def of(cls, pass_name: str, done: dict) -> BlockChange:
        """From a structural pass's record (see compressor.structure.ops)."""
        return cls(
            pass_name,
            done["depth_before"],
            done["depth_after"],
            tuple(done.get("removed_blocks", ())),
            tuple(tuple(w) for w in done.get("merged_windows", ())),
            tuple(done.get("zeroed", ())),
        )


@dataclass
class Plan:
    """Every decision of a run, as typed values: passes write it, the artifact writers and the report read it.

    Decisions made before the quantize pass carries them out (`schemes` by `allocate_bits`, `lowrank` by the
    `lowrank` pass) sit beside what each layer became (`layers`, `weights`, `compensations`); structural changes
    (`blocks`) and activation-aware scaling folds (`awq`) are recorded as they happen; `finish` records the
    artifact's layout (which linears stay float, in which dtype) once the passes are done.
    """

    dtype: torch.dtype = torch.float32  # the artifact's unquantized tensors
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    # low-rank corrections of quantization error (the `lowrank` pass), exported as a PEFT LoRA adapter
    compensations: dict[str, LowRankFactors] = field(default_factory=dict)
    # per-layer weight schemes chosen by `allocate_bits` (full module name -> scheme, None = keep float)
    schemes: dict[str, WeightScheme | None] = field(default_factory=dict)
    lowrank: CompensationRequest | None = None  # the corrections the `lowrank` pass asks the quantize pass for
    blocks: list[BlockChange] = field(default_factory=list)  # removed / fused / zeroed blocks, in the order done
    awq: list[AwqFold] = field(default_factory=list)  # activation-aware scales folded, per input group
    factored: dict[str, int] = field(default_factory=dict)  # linears decomposed into B A (`lowrank` decompose): rank
    # the artifact's layout, recorded by `finish` once the passes are done
    linears: list[str] = field(default_factory=list)  # the blocks' linears, then quantized ones outside the blocks
    ignore: list[str] = field(default_factory=list)  # linears a loader must leave float (a float head Linear too)
    embeddings: list[str] = field(default_factory=list)  # float input / output embeddings (a float head included)
    float_linears: list[str] = field(default_factory=list)  # other linears kept float
    sealed: bool = False  # `finish` ran: the layout above is recorded

    def record(self, layer: LayerPlan, weight: QuantizedWeight, compensation: LowRankFactors | None = None) -> None:
        weight.compact()
        self.layers[layer.name] = layer
        self.weights[layer.name] = weight
        if compensation is not None:
            self.compensations[layer.name] = compensation
        else:
            self.compensations.pop(layer.name, None)

    def finish(self, block_linears: list[str], head_linear: str | None, embeddings: list[str], floats: list[str]):
        """Record the artifact's layout: its linears (the blocks' in order, then quantized ones outside the blocks),
        which stay float (a float `head_linear` included, so loaders leave it alone), and the float embeddings and
        other float linears (their part of the size report)."""
        self.linears = block_linears + sorted(set(self.layers) - set(block_linears))
        self.ignore = sorted(set(block_linears) - set(self.layers))
        if head_linear is not None and head_linear not in self.layers:
            self.ignore.append(head_linear)
        self.embeddings = [n for n in embeddings if n not in self.layers]
        self.float_linears = [n for n in floats if n not in self.layers and n not in self.embeddings]
        self.sealed = True

    def size_roles(self) -> dict[str, str]:
        """Module name -> its part of the artifact's size: quantized, embeddings or float_linears."""
        roles = dict.fromkeys(self.float_linears, "float_linears")
        roles.update(dict.fromkeys(self.embeddings, "embeddings"))
        roles.update(dict.fromkeys(self.layers, "quantized"))
        return roles

    def effective_weight(self, name: str) -> torch.Tensor:
        """The float32 [out, in] weight the layer computes with: dequantized, plus its correction if it has one."""
        w = self.weights[name].dequantize()
        comp = self.compensations.get(name)
        return w if comp is None else w + comp.delta()

    def to_json(self) -> dict:
        """The plan as report.json records it."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "layers": {name: lp.to_json() for name, lp in self.layers.items()},  # execution order
            "ignore": self.ignore,
            "blocks": [asdict(b) for b in self.blocks],
            "awq": [asdict(f) for f in self.awq],
            "lowrank": None
            if self.lowrank is None
            else {"rank": self.lowrank.config.rank, "ranks": self.lowrank.ranks},
        }
