"""Subcommands of `compress` beyond the main run, one module each; cli.py registers them."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

import click

from ..errors import CompressorError


@contextlib.contextmanager
def exit_on_error(debug: bool, interrupted: str = "interrupted: nothing was written") -> Iterator[None]:
    """One line on stderr and the exit code for every failure: 2 user error, 130 Ctrl-C, 1 internal error."""
    try:
        yield
    except CompressorError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
    except Exception as err:  # internal error
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
