"""`compress export-onnx ARTIFACT OUT`: ONNX export of an existing compressed artifact."""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError

from . import exit_on_error


@click.command("export-onnx")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["matmulnbits", "qdq"]),
    default="matmulnbits",
    show_default=True,
    help="INT layers as com.microsoft.MatMulNBits or DequantizeLinear+MatMul (FP8 layers are always QDQ).",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="MatMulNBits accuracy_level (4: int8 activations, fastest on CPU; 0: float32 compute).",
)
@click.option(
    "--layer-accuracy-level",
    "layer_levels",
    multiple=True,
    metavar="PATTERN=LEVEL",
    help="accuracy_level for the layers whose name matches the regular expression PATTERN (repeatable; first "
    "match wins), e.g. 'lm_head=0' computes the output projection in float32.",
)
@click.option(
    "--block-size-max",
    type=click.Choice(["16", "32", "64", "128"]),
    default=None,
    help="Cap on the MatMulNBits block (wider groups repeat their scale, lossless). At accuracy level 4 "
    "onnxruntime quantizes activations per block: a smaller cap is more accurate and somewhat slower.",
)
@click.option("--opset", type=click.IntRange(21, 23), default=21, show_default=True, help="ONNX opset.")
@click.option(
    "--embeddings",
    type=click.Choice(["quantized", "float"]),
    default="quantized",
    show_default=True,
    help="Quantized input embeddings as GatherBlockQuantized, or as a dequantized float table.",
)
@click.option(
    "--graph",
    type=click.Choice(["auto", "fused", "traced"]),
    default="auto",
    show_default=True,
    help="Decoder graph: fused (llama/mistral/qwen2: GroupQueryAttention, fused q|k|v and gate|up; no left "
    "padding), traced (torch.onnx.export, any family and mask), auto (fused where supported).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
def export_onnx_command(
    artifact, out, fmt, accuracy_level, layer_levels, block_size_max, opset, embeddings, graph, overwrite, quiet, debug
) -> None:
    """Export a compressed artifact (written by `compress`) to ONNX in OUT (model.onnx, config, tokenizer)."""
    from pathlib import Path

    from exporters.onnx import export_artifact

    from ..schema.onnx import OnnxExportConfig

    by_layer = {}
    for item in layer_levels:
        pattern, _, level = item.rpartition("=")
        if not pattern or level not in {"0", "1", "2", "3", "4"}:
            click.echo(f"error: --layer-accuracy-level '{item}': expected PATTERN=LEVEL with LEVEL 0-4", err=True)
            sys.exit(2)
        by_layer[pattern] = int(level)
    try:
        config = OnnxExportConfig(
            format=fmt,
            accuracy_level=accuracy_level,
            accuracy_level_by_layer=by_layer,
            block_size_max=None if block_size_max is None else int(block_size_max),
            opset=opset,
            embeddings=embeddings,
            graph=graph,
        )
    except ValidationError as err:
        problem = err.errors()[0]
        click.echo(f"error: --layer-accuracy-level: {problem['msg']}", err=True)
        sys.exit(2)
    with exit_on_error(debug):
        files = export_artifact(Path(artifact), Path(out), config, overwrite=overwrite, quiet=quiet)
    click.echo(f"wrote {out} ({', '.join(files)})")
