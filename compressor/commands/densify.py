"""`compress densify ARTIFACT OUT`: decomposed layers multiplied back into a standard checkpoint."""

from __future__ import annotations

import click

from . import exit_on_error


@click.command("densify")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
def densify_command(artifact, out, overwrite, debug) -> None:
    """Write ARTIFACT (from a `lowrank` pass in mode decompose) to OUT with each factored layer's weight the product
    B A: a standard checkpoint that transformers loads without custom code (no size gain)."""
    from exporters.densify import densify_artifact

    with exit_on_error(debug):
        files = densify_artifact(artifact, out, overwrite=overwrite)
    click.echo(f"wrote {out} ({', '.join(files)})")
