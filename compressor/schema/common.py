"""Base model for every recipe section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    """Bytes in a recipe size such as '500MB', '2GB' or '1.5GiB'; ValueError when it is not one."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 500MB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @property
    def needs_calibration(self) -> bool:
        """Whether the pass reads calibration activations (the API then samples calibration windows)."""
        return False

    @property
    def needs_lm_head(self) -> bool:
        """Whether the pass measures the model's token predictions (a headless encoder makes none)."""
        return False
