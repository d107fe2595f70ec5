"""Structural passes `score`, `remove_blocks`, `fuse_blocks` (issue 3; placeholders until it lands)."""

from __future__ import annotations

from ..errors import RecipeError
from ..schema import FuseBlocksPass, RemoveBlocksPass, ScorePass
from ..state import CompressionState
from .base import register


@register(ScorePass)
@register(RemoveBlocksPass)
@register(FuseBlocksPass)
class NotYetImplemented:
    def __init__(self, config) -> None:
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        raise RecipeError(f"pass '{self.cfg.type}' is not implemented yet", where="passes", fix="remove it")
