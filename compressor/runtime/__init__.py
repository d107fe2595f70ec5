"""Runtime modules that hold compressed weights and run them (extension ops or a pure-torch fallback)."""

from .load import load
from .qlinear import QuantLinear

__all__ = ["QuantLinear", "load"]
