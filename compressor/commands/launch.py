"""`compress --nproc N`: start N worker processes through torch's own launcher (torchrun), one machine, and turn
its outcome into one line and an exit code."""

from __future__ import annotations

import logging
import os
import signal

import click

INTERRUPTED = 130


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (then it never launches workers of its own)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N` (the workers run as one process each)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch_workers(nproc: int, argv: list[str]) -> int:
    """Run `python -m compressor ARGV` in `nproc` processes under torchrun (standalone rendezvous on this machine,
    gloo on CPU). Returns 0 when every worker succeeded; when one fails or is killed, torchrun stops the others and
    this prints one line naming the first failed rank and its exit code or signal, and returns that worker's exit
    code (2 for a user error, 1 otherwise); Ctrl-C returns 130."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its summary is replaced by the line below
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several workers, without its warning
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "compressor", *without_nproc(argv)]
    )
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = min(err.failures.items(), key=lambda item: item[1].timestamp)
        click.echo(f"error: {_failure_text(rank, nproc, failure.exitcode)}", err=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except (KeyboardInterrupt, SignalException):
        click.echo("interrupted: every worker was stopped and nothing was written", err=True)
        return INTERRUPTED
    return 0


def _failure_text(rank: int, nproc: int, exitcode: int) -> str:
    if exitcode < 0:
        try:
            cause = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            cause = f"was killed by signal {-exitcode}"
    else:
        cause = f"exited with code {exitcode}" + (" (its error is above)" if exitcode in (1, 2) else "")
    return f"worker rank {rank} of {nproc} {cause}; the other workers were stopped and nothing was written"
