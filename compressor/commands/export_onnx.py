"""`compress export-onnx OUT`: ONNX export of an existing artifact (issue 6; placeholder)."""

from __future__ import annotations

import click


@click.command("export-onnx")
def export_onnx_command() -> None:
    """Export a compressed artifact to ONNX (not implemented yet)."""
    raise click.UsageError("`compress export-onnx` is not implemented yet")
