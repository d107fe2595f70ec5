"""ONNX export of compressed models (issue 6; placeholder until it lands)."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import RecipeError
from compressor.state import CompressionState


def export_onnx(state: CompressionState, folder: Path) -> list[str]:
    """Write the ONNX export of the compressed model into `folder`; returns the files written (relative)."""
    raise RecipeError("ONNX export is not implemented yet", where="export", fix="use export: [safetensors]")
