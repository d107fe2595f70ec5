"""Base model for every recipe section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @property
    def needs_calibration(self) -> bool:
        """Whether the pass reads calibration activations (the API then samples calibration windows)."""
        return False
