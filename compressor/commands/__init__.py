"""Subcommands of `compress` beyond the main run, one module each; cli.py registers them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator

import click

from ..errors import CompressorError
from .launch import launched_by_torchrun

_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def quiet_client_loggers() -> None:
    """Keep the hub client's retry chatter and per-request lines off stderr; failures surface as one error."""
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for client in ("httpx", "httpx2"):
        logging.getLogger(client).setLevel(logging.WARNING)


def parse_set_options(values: tuple[str, ...]) -> dict:
    """`--set KEY=VALUE` options as {dotted key: YAML-parsed value}."""
    import yaml

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CompressorError(f"--set expects KEY=VALUE, got {item!r}", fix="e.g. --set calibration.num_samples=32")
        out[key] = yaml.safe_load(raw)
    return out


def _shown(text: str) -> str:
    """`text` as one line (a library's multi-line message is joined), with any hub token masked: a token that
    reached a message from anywhere never reaches the terminal. A worker of a distributed run names its rank."""
    line = _HF_TOKEN.sub("hf_***", " ".join(line.strip() for line in text.splitlines() if line.strip()))
    if not launched_by_torchrun():
        return line
    return f"[rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}] {line}"


def _peer_failure(err: Exception) -> bool:
    """A distributed collective that failed because another worker went away (torch.distributed / gloo errors)."""
    if not launched_by_torchrun():
        return False
    text = str(err)
    return type(err).__name__.startswith("Dist") or "gloo" in text or "Connection closed" in text


@contextlib.contextmanager
def exit_on_error(debug: bool, interrupted: str = "interrupted: nothing was written") -> Iterator[None]:
    """One line on stderr and the exit code for every failure: 2 user error, 130 Ctrl-C, 1 internal error."""
    try:
        yield
    except CompressorError as err:
        if debug:
            traceback.print_exc()
        click.echo(_shown(f"error: {err}"), err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:  # an UploadInterrupted says what state the upload is in
        if os.environ.get("RANK", "0") == "0":  # a distributed run's interruption is said once
            click.echo(_shown(f"interrupted: {err}") if str(err) else interrupted, err=True)
        sys.exit(130)
    except Exception as err:  # internal error
        if debug:
            traceback.print_exc()
        if _peer_failure(err):
            click.echo(_shown(f"stopped: another worker failed ({type(err).__name__})"), err=True)
            sys.exit(1)
        click.echo(
            _shown(
                f"internal error: {type(err).__name__}: {err} (a defect of compressor, not of your input: rerun "
                "with --debug and report the traceback)"
            ),
            err=True,
        )
        sys.exit(1)
