"""compressor: compress Hugging Face models into deployable compressed-tensors artifacts.

The public names load on first use (PEP 562), so `import compressor.X` from any module below the API (exporters,
the runtime) neither pulls in the API nor forms an import circle. Submodules (`compressor.api`, ...) load on first
attribute access too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "CompressionResult": "compressor.api",
    "compress": "compressor.api",
    "CompressorError": "compressor.errors",
    "Recipe": "compressor.recipe",
    "load_recipe": "compressor.recipe",
    "load": "compressor.runtime.load",
}

__all__ = ["CompressionResult", "CompressorError", "Recipe", "compress", "load", "load_recipe", "__version__"]

if TYPE_CHECKING:  # static readers see the real names
    from .api import CompressionResult, compress
    from .errors import CompressorError
    from .recipe import Recipe, load_recipe
    from .runtime.load import load


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
