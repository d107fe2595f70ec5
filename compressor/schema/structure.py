"""Recipe schema of the structural passes: `score`, `remove_blocks`, `fuse_blocks`."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .common import Strict

SCORE_METRICS = ("bi", "lim", "angular", "zd", "loss", "kl")


class _Sampling(Strict):
    """How much of the calibration set the structural numerics use."""

    max_samples: int | None = Field(
        32, gt=0, description="calibration windows for the cosine / angular statistics (None: all)"
    )
    measure_samples: int = Field(
        8, gt=0, description="calibration windows for measured skip loss / KL (each candidate reruns later blocks)"
    )
    measure_batch_size: int = Field(2, gt=0, description="windows per forward while measuring (bounds logits memory)")


class ScorePass(_Sampling):
    """Per-block and per-branch importance scores into report.json (`scores`) and scores.png."""

    type: Literal["score"]
    measure: bool = Field(True, description="also measure loss / KL increase when each unit alone is skipped")
    sublayers: bool = Field(True, description="also score the attention and MLP branches where the family allows")
    max_distance: int = Field(8, gt=0, description="angular distance d(l, l+n) for every n up to this")
    plot: bool = Field(True, description="write scores.png into the artifact")

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def needs_lm_head(self) -> bool:
        return self.measure  # loss / KL increases


class _Count(Strict):
    count: int | None = Field(None, gt=0, description="blocks (or branches) to remove")
    fraction: float | None = Field(None, gt=0, lt=1, description="fraction of the depth to remove (rounded down)")

    @model_validator(mode="after")
    def _one_amount(self):
        explicit = getattr(self, "blocks", None) is not None or getattr(self, "start", None) is not None
        given = (self.count is not None) + (self.fraction is not None)
        if explicit and given:
            raise ValueError("explicit blocks/start replace count and fraction; give only one of them")
        if not explicit and given != 1:
            raise ValueError("give exactly one of count, fraction")
        return self

    def amount(self, depth: int) -> int:
        """How many units to remove from a model of this depth (fraction rounds down, at least 1)."""
        if self.count is not None:
            return self.count
        return max(1, math.floor(self.fraction * depth + 1e-9))


class RemoveBlocksPass(_Count, _Sampling):
    """Drop decoder blocks (or only their attention / MLP branches) chosen by score, window or greedy search."""

    type: Literal["remove_blocks"]
    method: str = Field(
        "greedy",
        description="'score:<bi|lim|angular|zd|loss|kl>' (drop the least important), 'contiguous' "
        "(window with the smallest angular distance), 'greedy' (measured, re-measured after each drop)",
    )
    attention_only: bool = Field(False, description="drop attention branches instead of whole blocks")
    mlp_only: bool = Field(False, description="drop MLP branches instead of whole blocks")
    objective: Literal["loss", "kl"] = Field("loss", description="greedy: what a drop may raise least")
    shortlist: int | None = Field(
        8, gt=0, description="greedy: after the first round re-measure only this many best candidates (None: all)"
    )
    blocks: list[int] | None = Field(None, description="explicit block indices to remove (overrides method)")

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value in ("contiguous", "greedy"):
            return value
        kind, _, metric = value.partition(":")
        if kind != "score" or metric not in SCORE_METRICS:
            raise ValueError(f"method must be 'greedy', 'contiguous' or 'score:<{'|'.join(SCORE_METRICS)}>'")
        return value

    @model_validator(mode="after")
    def _branches(self):
        if self.attention_only and self.mlp_only:
            raise ValueError("attention_only and mlp_only exclude each other")
        if (self.attention_only or self.mlp_only) and self.method == "contiguous":
            raise ValueError("contiguous removal works on whole blocks; use greedy or score:<metric> for branches")
        return self

    @property
    def kind(self) -> str:
        return "attention" if self.attention_only else "mlp" if self.mlp_only else "block"

    @property
    def needs_calibration(self) -> bool:
        return self.blocks is None and self.method != "score:zd"

    @property
    def needs_lm_head(self) -> bool:
        return self.blocks is None and self.method in ("greedy", "score:loss", "score:kl")


class FuseBlocksPass(_Count, _Sampling):
    """Merge groups of adjacent blocks into one (LaCo parameter merging, optional least-squares correction)."""

    type: Literal["fuse_blocks"]
    group_size: int = Field(2, ge=2, description="adjacent blocks merged into one (each merge removes group_size-1)")
    select: Literal["angular", "check"] = Field(
        "angular",
        description="'angular': windows with the smallest angular distance d(l, l+group_size); 'check': LaCo walk "
        "from the top, accepting a merge when the final hidden states keep cosine >= threshold with the base",
    )
    threshold: float = Field(0.9, gt=0, le=1, description="select=check: minimum cosine of final hidden states")
    correct: bool = Field(True, description="least-squares correction of the merged output projections")
    ridge: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="correction: ridge toward the starting weight, r x mean diag of F^T F; 'auto': r chosen per "
        "projection by the error on held-out calibration windows",
    )
    start: int | None = Field(None, ge=0, description="explicit first block of a single merge (overrides select)")

    @property
    def needs_calibration(self) -> bool:
        return True
