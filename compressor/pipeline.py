"""Run the recipe's passes in order over one CompressionState."""

from __future__ import annotations

import logging
import time

from .passes import run_pass
from .state import CompressionState

log = logging.getLogger(__name__)


def run_passes(state: CompressionState) -> list[dict]:
    """Run every pass, then record the artifact's layout in the plan; returns [{type, seconds}] for the report."""
    timings = []
    for i, cfg in enumerate(state.recipe.passes):
        start = time.perf_counter()
        log.info("pass %d/%d: %s", i + 1, len(state.recipe.passes), cfg.type)
        run_pass(cfg, state)
        timings.append({"type": cfg.type, "seconds": round(time.perf_counter() - start, 3)})
    state.finish_plan()
    return timings
