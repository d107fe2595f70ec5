"""Registry mapping a pass config type to the class that runs it."""

from __future__ import annotations

from typing import Protocol

from ..errors import RecipeError
from ..schema import QuantizePass
from ..state import CompressionState

PASSES: dict[type, type] = {}


class Pass(Protocol):
    def __init__(self, config) -> None: ...

    def run(self, state: CompressionState) -> None: ...


def register(config_type: type):
    def deco(cls):
        PASSES[config_type] = cls
        return cls

    return deco


def run_pass(config, state: CompressionState) -> None:
    PASSES[type(config)](config).run(state)


def following_quantize(state: CompressionState, config, pass_name: str, hands_over: str) -> QuantizePass:
    """The first `quantize` pass after `config` in the recipe; a RecipeError when there is none."""
    passes = state.recipe.passes
    mine = next(i for i, p in enumerate(passes) if p is config)
    for p in passes[mine + 1 :]:
        if p.type == "quantize":
            return p
    raise RecipeError(
        f"{pass_name} {hands_over} a later quantize pass, but none follows it",
        where="passes",
        fix=f"add a `- type: quantize` pass after {pass_name}",
    )
