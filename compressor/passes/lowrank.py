"""The `lowrank` pass: hand a low-rank compensation request to the `quantize` pass that follows.

The factors are fitted inside the quantize pass (`compressor.quant.lowrank`), layer by layer with the input
statistics GPTQ solves with, so that blocks downstream are calibrated on the corrected outputs; this pass only
checks the recipe and records the request, the way `allocate_bits` records formats.
"""

from __future__ import annotations

import logging

from ..schema import LowRankPass
from ..state import CompressionState
from .base import following_quantize, register

log = logging.getLogger(__name__)


@register(LowRankPass)
class LowRankRunner:
    def __init__(self, config: LowRankPass):
        self.cfg = config

    def run(self, state: CompressionState) -> None:
        quant = following_quantize(state, self.cfg, "lowrank", "corrects the quantization error of")
        state.compensation = self.cfg
        log.info("lowrank: the quantize pass (%s) fits rank-%d corrections of its error", quant.method, self.cfg.rank)
