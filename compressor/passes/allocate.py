"""The `allocate_bits` pass (issue 4; placeholder until it lands)."""

from __future__ import annotations

from ..errors import RecipeError
from ..schema import AllocateBitsPass
from ..state import CompressionState
from .base import register


@register(AllocateBitsPass)
class AllocateBitsRunner:
    def __init__(self, config: AllocateBitsPass) -> None:
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        raise RecipeError("pass 'allocate_bits' is not implemented yet", where="passes", fix="remove it")
