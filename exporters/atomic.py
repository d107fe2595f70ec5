"""Write a directory atomically: build it under a temporary name beside the target, rename when complete."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from compressor.errors import ArtifactCheckError, OutputError, io_errno

log = logging.getLogger(__name__)


# What marks a directory as written by compress: the report of a run, or the ONNX / GGUF exporter's layer record.
MARKERS = {"report.json": "compressor_version", "onnx_export.json": "layers", "gguf_export.json": "tensors"}


def written_by_compressor(path: Path) -> bool:
    """Whether `path` holds a marker file that a compress run or an ONNX or GGUF export wrote."""
    for name, key in MARKERS.items():
        try:
            if key in json.loads((path / name).read_text()):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def _protected(path: Path) -> bool:
    """The filesystem root, the home directory, the current directory or one of its parents."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    return resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd.is_relative_to(resolved)


def check_output(path: Path, overwrite: bool) -> None:
    """Fail early when the output exists (unless overwrite may replace it) or is not a directory.

    --overwrite replaces only an empty directory or one a previous compress run (or ONNX export) wrote, never the
    filesystem root, the home directory, the current directory or a parent of it."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"output '{path}' exists and is not a directory", fix="choose another --output")
    if not overwrite:
        raise OutputError(f"output '{path}' already exists", fix="choose another --output or pass --overwrite")
    if _protected(path):
        raise OutputError(
            f"--overwrite refuses to replace '{path}' (the root, home or current directory, or a parent of it)",
            fix="choose a new directory for --output",
        )
    if any(path.iterdir()) and not written_by_compressor(path):
        raise OutputError(
            f"--overwrite replaces only directories written by compress, and '{path}' has no report.json from a run",
            fix="choose another --output, or move that directory away yourself",
        )


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` folders beside `path` left by runs that no longer exist (killed
    mid-write); returns what was removed."""
    removed = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if not (kind.endswith((".partial", ".old")) and pid.isdigit()) or _alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_failure(path: Path, err: BaseException) -> OutputError | None:
    """The OutputError for a write into `path` that failed for a reason the user can fix (a full disk, no
    permission, a read-only filesystem), or None for any other failure (a defect: it stays an internal error).

    `err` is an OSError, or safetensors' SafetensorError, which reports the OS error only in its message."""
    code = io_errno(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"no space left on the device while writing '{path}' (the disk is full)",
            fix="free space or choose --output on another disk",
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write '{path}': {os.strerror(code)}", fix="choose a writable --output")
    return None


@contextlib.contextmanager
def atomic_directory(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`, on any failure it is removed."""
    from safetensors import SafetensorError

    path = Path(path)
    check_output(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create '{path.parent}': {err.strerror}", fix="choose a writable --output") from None
    for leftover in remove_stale_partials(path):
        log.warning(f"removed '{leftover}', left by an earlier run that was killed while writing")
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as err:
        raise (write_failure(path, err) or err) from None
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(path, err)
        if failure is None:
            raise
        raise failure from None
    except ArtifactCheckError:  # our defect: keep what was written for the bug report, under a name that says so
        broken = path.parent / f"{path.name}.broken"
        shutil.rmtree(broken, ignore_errors=True)
        tmp.rename(broken)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
