"""compressor: compress Hugging Face models into deployable compressed-tensors artifacts."""

__version__ = "0.1.0"

from .api import CompressionResult, compress  # noqa: E402
from .errors import CompressorError  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402
from .runtime.load import load  # noqa: E402

__all__ = ["CompressionResult", "CompressorError", "Recipe", "compress", "load", "load_recipe", "__version__"]
