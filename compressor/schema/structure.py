"""Recipe schema of the structural passes: `score`, `remove_blocks`, `fuse_blocks` (issue 3)."""

from __future__ import annotations

from typing import Literal

from .common import Strict


class ScorePass(Strict):
    """Per-block importance scores (placeholder until issue 3 lands)."""

    type: Literal["score"]

    @property
    def needs_calibration(self) -> bool:
        return True


class RemoveBlocksPass(Strict):
    """Drop decoder blocks (placeholder until issue 3 lands)."""

    type: Literal["remove_blocks"]

    @property
    def needs_calibration(self) -> bool:
        return True


class FuseBlocksPass(Strict):
    """Merge adjacent decoder blocks (placeholder until issue 3 lands)."""

    type: Literal["fuse_blocks"]

    @property
    def needs_calibration(self) -> bool:
        return True
