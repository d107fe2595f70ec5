"""Recipe schema of the `allocate_bits` pass: candidate formats, the size budget, and how layers are ranked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from .common import Strict
from .quantize import WeightScheme
from .targets import TARGETS, RuntimeTarget

KEEP = "keep"
_CANDIDATE = re.compile(
    r"^(?P<kind>int|fp)(?P<bits>\d)[\s-]+(?P<layout>g(?P<group>\d+)|channel|tensor|block)(?:[\s-]+(?P<sym>sym|asym))?$"
)


_RANK = re.compile(r"^(?P<format>.*?)[\s-]+rank[\s-]+(?P<value>\d+(?:\.\d+)?)(?P<percent>%?)$")
RANK_TARGETS = ("compressor", "onnxruntime")  # runtimes that load factored layers (transformers and vLLM do not)


@dataclass(frozen=True)
class RankChoice:
    """The rank part of a candidate: a fixed rank, or the share of the dense matrix's parameters the two factors
    hold (`rank 50%`: r (out + in) = 0.5 out x in)."""

    rank: int | None = None
    share: float | None = None

    def for_shape(self, out_features: int, in_features: int, multiple: int = 8) -> int | None:
        """This choice's rank for an out x in matrix, None where factoring would not make it smaller (a rank at
        or above the break-even rank) or the rank would be 0. A share's rank is rounded down to `multiple` (the
        factors' group size, so B's input width holds whole groups) when it is at least that, else to 16 or 8."""
        from ..quant.lowrank import breakeven_rank  # (torch: not loaded for `--help` or a recipe check)

        breakeven = breakeven_rank(out_features, in_features)
        if self.rank is not None:
            r = self.rank
        else:
            r = int(self.share * out_features * in_features / (out_features + in_features))
            for step in (multiple, 16, 8):  # whole groups, else a width kernels block well (MatMulNBits: 16)
                if r >= step:
                    r -= r % step
                    break
        return r if 0 < r <= breakeven else None

    def __str__(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"rank {self.share * 100:g}%"


def parse_rank_candidate(text: str) -> tuple[WeightScheme | None, RankChoice | None]:
    """'int4 g64 rank 50%' -> (the factors' scheme, RankChoice(share=0.5)); 'keep rank 128' -> (None, rank 128);
    a candidate without a rank part -> (its scheme, None)."""
    m = _RANK.match(text.strip().lower())
    if not m:
        return parse_candidate(text), None
    value = float(m["value"])
    if m["percent"]:
        if not 0 < value < 100:
            raise ValueError(f"candidate {text!r}: a rank share is a percentage between 0 and 100 (e.g. rank 50%)")
        return parse_candidate(m["format"]), RankChoice(share=value / 100)
    if value != int(value) or value < 1:
        raise ValueError(f"candidate {text!r}: a rank is a whole number >= 1, or a share such as 'rank 50%'")
    return parse_candidate(m["format"]), RankChoice(rank=int(value))


def parse_candidate(text: str) -> WeightScheme | None:
    """'int4 g128', 'int3-g64 asym', 'int8 channel', 'fp8 channel', 'fp8 block' -> WeightScheme; 'keep' -> None."""
    t = text.strip().lower()
    if t == KEEP:
        return None
    m = _CANDIDATE.match(t)
    if not m:
        raise ValueError(
            f"cannot read candidate {text!r}; write e.g. 'int4 g128', 'int3 g64 asym', 'int8 channel', "
            "'fp8 channel', 'fp8 block' or 'keep' (in allocate_bits.candidates, optionally with a rank: "
            "'int4 g64 rank 50%', 'keep rank 128')"
        )
    bits = int(m["bits"])
    layout = "group" if m["group"] else m["layout"]
    if m["kind"] == "fp":
        if bits != 8:
            raise ValueError(f"candidate {text!r}: floating point weights are fp8 (E4M3)")
        return WeightScheme(format="fp8", bits=8, strategy=layout, group_size=None)
    return WeightScheme(
        format="int",
        bits=bits,
        strategy=layout,
        group_size=int(m["group"]) if m["group"] else None,
        symmetric=m["sym"] != "asym",
    )


class Budget(Strict):
    """The size budget of the allocated linears, weights plus scales and zero points. Give exactly one."""

    bits_per_weight: float | None = Field(None, gt=0, le=32, description="average bits per weight, e.g. 4.25")
    size: str | None = Field(None, description="total bytes of the allocated linears, e.g. '55MB'")
    uniform: str | None = Field(
        None, description="the size these layers take in one candidate format for all, e.g. 'int4 g128'"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [k for k in ("bits_per_weight", "size", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bits_per_weight, size, uniform (got {given or 'none'})")
        if self.uniform is not None:
            parse_candidate(self.uniform)
        return self


class AllocationCheck(Strict):
    """Checks of a `measured` / `search` allocation against end-to-end KL on held-out calibration windows."""

    probes: int = Field(
        16,
        ge=0,
        description="linears (spread over depth and kinds) whose predicted KL at the cheapest candidate is ranked "
        "against their measured KL; the report gives Spearman's rank correlation. 0: no rank check",
    )
    samples: int = Field(
        4, gt=0, description="held-out calibration windows (after the sweep's num_samples) each KL is measured on"
    )
    min_rank_correlation: float = Field(
        0.5, ge=-1, le=1, description="a rank correlation below this logs a warning naming the remedies"
    )
    fallback: bool = Field(
        True,
        description="use the best uniform allocation that fits the budget where it measures lower KL than the mix "
        "(false: the comparison is still measured and reported, the mix kept)",
    )

    @field_validator("probes")
    @classmethod
    def _enough_for_a_ranking(cls, v: int) -> int:
        if v == 1:
            raise ValueError("a rank correlation needs at least 2 probes (0 skips the rank check)")
        return v


class AllocateBitsPass(Strict):
    """Choose one candidate format per linear (or per block) minimising the predicted KL under a size budget.

    The choice is handed to the `quantize` pass that must follow; its method (GPTQ or RTN), scale dtype and
    group policy apply to every layer.
    """

    type: Literal["allocate_bits"]
    candidates: list[str] = Field(
        default_factory=lambda: ["int3 g64", "int4 g128", "int4 g64", "int8 channel"],
        min_length=1,
        description="formats a layer may take: 'int<b> g<size>|channel [asym]', 'fp8 channel|block', 'keep'; "
        "with ' rank R' or ' rank P%' the linear is factored into B A (whitened truncation, as lowrank decompose) "
        "of rank R, or holding P% of its parameters, and both factors take the format",
    )
    budget: Budget
    target: Literal["auto", "compressor", "vllm", "onnxruntime", "llama.cpp"] = Field(
        "auto",
        description="runtime the mix is made for; candidates it has no fast kernel for are refused. auto: "
        "onnxruntime when the recipe exports ONNX, else compressor (compressor.load's kernels)",
    )
    method: Literal["measured", "lim", "zd", "search"] = Field(
        "measured",
        description="measured: Fisher-weighted error per layer and candidate + exact knapsack; lim / zd: the seed "
        "paper's block orderings; search: measured, then an evolutionary refinement by end-to-end KL",
    )
    granularity: Literal["linear", "block"] = Field("linear", description="one format per linear or per block")
    solver: Literal["exact", "greedy"] = Field("exact", description="exact multiple-choice knapsack, or greedy")
    num_samples: int = Field(16, gt=0, description="calibration samples for the sensitivity sweep (first N)")
    error_model: Literal["auto", "rtn", "gptq"] = Field(
        "auto", description="quantization error each candidate is scored with; auto = the quantize pass's method"
    )
    search_seconds: float = Field(120.0, gt=0, description="method search: wall-time budget of the refinement")
    search_samples: int = Field(4, gt=0, description="method search: held-out calibration samples scoring KL")
    check: AllocationCheck | None = Field(
        default_factory=AllocationCheck,
        description="measured-KL checks of the sensitivity model and the mix (methods measured and search); "
        "false or null skips them",
    )
    cache: bool = Field(True, description="cache sensitivities on disk (keyed by model, calibration, candidates)")
    cache_dir: str | None = Field(
        None, description="sensitivity cache folder (default $COMPRESSOR_CACHE_DIR or ~/.cache/compressor)"
    )

    @field_validator("candidates")
    @classmethod
    def _readable(cls, v: list[str]) -> list[str]:
        parsed = [parse_rank_candidate(c) for c in v]
        if len(set(v)) != len(v):
            raise ValueError("candidates must not repeat")
        if all(rank is not None for _, rank in parsed):
            raise ValueError(
                "give at least one candidate without a rank (the format a matrix takes when it stays dense)"
            )
        return v

    @field_validator("check", mode="before")
    @classmethod
    def _switch(cls, v):
        """`check: false` / `null` turns the checks off, `check: true` takes the defaults."""
        if v is False:
            return None
        return {} if v is True else v

    _implied_target: str = PrivateAttr("compressor")  # set by the Recipe from its exports (target: auto)

    @model_validator(mode="after")
    def _orderings_need_blocks(self) -> AllocateBitsPass:
        if self.method == "lim" and self.granularity != "block":
            raise ValueError("method lim scores whole blocks; set granularity: block")
        return self

    @model_validator(mode="after")
    def _ranks_need_measured_linears(self) -> AllocateBitsPass:
        """Rank candidates are priced per matrix by predicted KL: method measured, one choice per linear."""
        if any(r is not None for r in self.rank_choices()):
            if self.method != "measured":
                raise ValueError(
                    f"rank candidates need method: measured (method {self.method} does not predict what a "
                    "truncation costs)"
                )
            if self.granularity != "linear":
                raise ValueError("rank candidates are chosen per matrix; set granularity: linear")
        return self

    def imply_target(self, name: str) -> None:
        """Record the target that `target: auto` stands for in this recipe."""
        self._implied_target = name

    @property
    def runtime(self) -> RuntimeTarget:
        """The target the allocation is made for (auto resolved)."""
        return TARGETS[self._implied_target if self.target == "auto" else self.target]

    def target_refusals(self) -> list[str]:
        """Why candidates cannot run on the target: one line per refused candidate (empty when all can)."""
        refusals = [self.runtime.refusal(c, s) for c, s in zip(self.candidates, self.schemes())]
        factored = [c for c, r in zip(self.candidates, self.rank_choices()) if r is not None]
        if factored and self.runtime.name not in RANK_TARGETS:
            refusals.append(
                f"candidate {factored[0]!r} factors a linear, which target {self.runtime.name} cannot load (only "
                f"{' and '.join(RANK_TARGETS)} run factored layers); drop the rank candidates or set "
                "allocate_bits.target"
            )
        return [r for r in refusals if r]

    def schemes(self) -> list[WeightScheme | None]:
        """Each candidate's weight scheme (of the factors, for a rank candidate); None: kept in float."""
        return [parse_rank_candidate(c)[0] for c in self.candidates]

    def rank_choices(self) -> list[RankChoice | None]:
        """Each candidate's rank part (None: the matrix stays dense)."""
        return [parse_rank_candidate(c)[1] for c in self.candidates]

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def needs_lm_head(self) -> bool:
        return True  # sensitivities are the KL of the output distribution
