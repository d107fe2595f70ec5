"""Compression passes: one class per pass type, registered by its recipe config type."""

from . import allocate, lowrank, structure  # noqa: F401  (registration)
from .base import PASSES, run_pass
from .quantize import QuantizeRunner

__all__ = ["PASSES", "run_pass", "QuantizeRunner"]
