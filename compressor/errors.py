"""Error types shared by the API and the CLI.

A `CompressorError` is a *user* error: bad input the user can fix. Its message names what is wrong, where,
and how to fix it; the CLI prints it as one line and exits with code 2. Anything else is an internal error
(exit code 1).
"""

from __future__ import annotations

import re


class CompressorError(Exception):
    """A user-fixable error. `str(err)` is the one-line message the CLI prints."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class RecipeError(CompressorError):
    """The recipe is malformed or names an invalid value."""


class ModelError(CompressorError):
    """The model cannot be found, loaded, or is not supported."""


class CalibrationError(CompressorError):
    """The calibration data is missing or unusable."""


class OutputError(CompressorError):
    """The output location cannot be written."""


class HubError(CompressorError):
    """The hub target is invalid, unreachable, or refused the upload."""


class ArtifactCheckError(Exception):
    """The artifact just written does not load back, or does not reproduce the compressed model: a defect of
    compressor, not of the input (internal error, exit code 1). The artifact is kept beside the output as
    `NAME.broken` for the bug report."""


class UploadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a hub upload; `str(err)` says what state the upload is in and how to retry it."""

    def __init__(self, what: str, *, fix: str):
        super().__init__(f"{what}. Fix: {fix}")


def io_errno(err: BaseException) -> int | None:
    """The errno of a failed file operation: an OSError's own, or the one a Rust library (safetensors) gives in
    its message as '(os error N)'; None for anything else."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None
