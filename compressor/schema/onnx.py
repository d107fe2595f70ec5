"""Recipe schema of the ONNX export options (issue 6)."""

from __future__ import annotations

from .common import Strict


class OnnxExportConfig(Strict):
    """How quantized linears are written to ONNX (placeholder until issue 6 lands)."""
