"""Registry mapping a pass config type to the class that runs it."""

from __future__ import annotations

from typing import Protocol

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
