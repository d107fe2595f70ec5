"""`compress export-gguf ARTIFACT OUT`: a written artifact as one GGUF file for llama.cpp."""

from __future__ import annotations

import click

from . import exit_on_error


@click.command("export-gguf")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
def export_gguf_command(artifact, out, overwrite, quiet, debug) -> None:
    """Write ARTIFACT (written by `compress`) to OUT/model.gguf: INT8 g32 layers as Q8_0 and INT4 g32 symmetric
    layers as Q4_0, exactly from their codes (other formats are refused), float tensors in the artifact's dtype."""
    from exporters.gguf import export_artifact

    with exit_on_error(debug):
        files = export_artifact(artifact, out, overwrite=overwrite, quiet=quiet)
    click.echo(f"wrote {out} ({', '.join(files)})")
