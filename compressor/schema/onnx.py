"""Recipe schema of the ONNX export options (`onnx:` section, used when `export` lists `onnx`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from .common import Strict


class OnnxExportConfig(Strict):
    """How quantized layers are written to ONNX (see docs/onnx.md)."""

    format: Literal["matmulnbits", "qdq"] = Field(
        "matmulnbits",
        description="int layers as com.microsoft.MatMulNBits, or opset-21 blocked DequantizeLinear + MatMul "
        "(FP8 layers are always DequantizeLinear + MatMul)",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4,
        description="MatMulNBits accuracy_level: 0 unset (fp32 compute on CPU), 1 fp32, 2 fp16, 3 bf16, "
        "4 int8 activations (fastest on CPU)",
    )
    accuracy_level_by_layer: dict[str, Literal[0, 1, 2, 3, 4]] = Field(
        default_factory=dict,
        description="per-layer MatMulNBits accuracy_level: regular expressions searched in each quantized layer's "
        "name (e.g. `lm_head`, `self_attn\\.[qkv]_proj`), first match wins, others use accuracy_level; every "
        "pattern must match a layer",
    )
    block_size_max: Literal[16, 32, 64, 128] | None = Field(
        None,
        description="cap on the MatMulNBits block (a group wider than it repeats its scale per block, lossless); at "
        "accuracy_level 4 onnxruntime quantizes activations per block, so a smaller cap trades scale bytes and "
        "speed for accuracy",
    )
    opset: int = Field(21, ge=21, le=23, description="ONNX opset of the default domain")
    embeddings: Literal["quantized", "float"] = Field(
        "quantized",
        description="quantized input embeddings: GatherBlockQuantized, or a dequantized float table",
    )
    graph: Literal["auto", "fused", "traced"] = Field(
        "auto",
        description="decoder graph: `fused` (llama/mistral/qwen2: GroupQueryAttention, fused q|k|v and gate|up "
        "MatMulNBits, SkipSimplifiedLayerNormalization; unpadded or right-padded batches), `traced` "
        "(torch.onnx.export of the transformers model, any family and any mask), `auto` (fused where supported)",
    )

    @field_validator("accuracy_level_by_layer")
    @classmethod
    def _patterns_compile(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"'{pattern}' is not a regular expression ({err})") from None
        return value

    def level_for(self, layer: str) -> int:
        """The accuracy_level of one layer: its first matching `accuracy_level_by_layer` pattern, else the default."""
        for pattern, level in self.accuracy_level_by_layer.items():
            if re.search(pattern, layer):
                return level
        return self.accuracy_level
