"""Recipe schema of the `allocate_bits` pass (issue 4)."""

from __future__ import annotations

from typing import Literal

from .common import Strict


class AllocateBitsPass(Strict):
    """Layer-wise bit allocation under a size budget (placeholder until issue 4 lands)."""

    type: Literal["allocate_bits"]

    @property
    def needs_calibration(self) -> bool:
        return True
