"""Recipe sections, one module per pass family; `recipe.py` assembles them into the Recipe model."""

from typing import Annotated, Union

from pydantic import Field

from .allocate import AllocateBitsPass
from .common import Strict
from .lowrank import LowRankPass
from .onnx import OnnxExportConfig
from .quantize import QuantizePass, WeightScheme
from .structure import FuseBlocksPass, RemoveBlocksPass, ScorePass

PassConfig = Annotated[
    Union[QuantizePass, ScorePass, RemoveBlocksPass, FuseBlocksPass, AllocateBitsPass, LowRankPass],  # noqa: UP007
    Field(discriminator="type"),
]

__all__ = [
    "AllocateBitsPass",
    "FuseBlocksPass",
    "LowRankPass",
    "OnnxExportConfig",
    "PassConfig",
    "QuantizePass",
    "RemoveBlocksPass",
    "ScorePass",
    "Strict",
    "WeightScheme",
]
