"""Write a directory atomically: build it under a temporary name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from compressor.errors import OutputError


def check_output(path: Path, overwrite: bool) -> None:
    """Fail early when the output exists (unless overwrite) or its parent cannot be created."""
    if path.exists() and not overwrite:
        raise OutputError(f"output '{path}' already exists", fix="choose another --output or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output '{path}' exists and is not a directory", fix="choose another --output")


@contextlib.contextmanager
def atomic_directory(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    check_output(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create '{path.parent}': {err.strerror}", fix="choose a writable --output") from None
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"the disk is full while writing '{path}'",
                fix="free space or choose --output on another disk",
            ) from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write '{path}': {err.strerror}", fix="choose a writable --output") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
