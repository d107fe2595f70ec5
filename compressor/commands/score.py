"""`compress score`: print block-importance scores without writing an artifact (issue 3; placeholder)."""

from __future__ import annotations

import click


@click.command("score")
def score_command() -> None:
    """Print per-block importance scores (not implemented yet)."""
    raise click.UsageError("`compress score` is not implemented yet")
