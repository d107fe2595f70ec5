"""`compress push ARTIFACT REPO_ID`: upload an artifact written earlier to the Hugging Face Hub."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import exit_on_error, quiet_client_loggers


@click.command("push")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--public", is_flag=True, help="Create the repository public (default: private).")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to (created if missing).")
@click.option("--message", "-m", "commit_message", help="Commit message.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
def push_command(artifact, repo_id, public, revision, commit_message, quiet, debug) -> None:
    """Upload ARTIFACT (a directory written by `compress`) to REPO_ID on the hub as one commit.

    Weight files in the repository that ARTIFACT lacks (safetensors, shard indexes, ONNX) are deleted in that
    commit; other files stay. The token comes from HF_TOKEN (or `hf auth login`); HF_ENDPOINT selects another hub.
    """
    from exporters.hub import push_artifact

    from ..recipe import parse_recipe

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    quiet_client_loggers()
    with exit_on_error(debug, "interrupted: nothing was pushed"):
        hub = {"repo_id": repo_id, "private": not public, "revision": revision, "commit_message": commit_message}
        target = parse_recipe({"hub": hub}, "push").hub
        url = push_artifact(Path(artifact), target, quiet=quiet)
    click.echo(f"pushed {artifact} to {url}")
