"""A decoder's logits on evaluation windows, computed block by block: evaluation of a model that is not in memory.

`eval.metrics.evaluate_windows` reads a `BlockwiseLogits` where it would read a model: `prepare(batches)` runs every
batch of windows through the blocks block-major (each block brought in once by the `residency`, run on every batch,
let go; `engine.final_hidden_block_by_block`), then `window_logits(ids)` gives each window's logits a slice of
positions at a time from the kept last-block outputs, through the model's own post-block code (`engine.head_logits`).
The numbers are those of the model run whole: the same operations, block by block.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .engine import Residency, final_hidden_block_by_block, head_logits


class BlockwiseLogits:
    """Logits of `model` (blocks `blocks`, brought in by `residency`) on batches of windows, block by block."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, residency: Residency) -> None:
        self.model, self.blocks, self.residency = model, blocks, residency
        self._pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def prepare(self, batches: Sequence[torch.Tensor]) -> None:
        """Run every batch [B, S] through every block; `window_logits` then serves them in this order."""
        self.residency.load_outside()
        finals = final_hidden_block_by_block(self.model, self.blocks, batches, self.residency)
        self._pending = deque(zip(batches, finals))

    def window_logits(self, ids: torch.Tensor) -> Iterator:
        """For each window of the next prepared batch `ids`: a function (start, stop) -> its float32 logits there."""
        batch, final = self._pending.popleft()
        if not torch.equal(batch, ids):
            raise RuntimeError("BlockwiseLogits.window_logits called out of the prepared batches' order")
        for b in range(ids.shape[0]):
            yield lambda start, stop, b=b: self._logits(ids[b : b + 1, start:stop], final[b : b + 1, start:stop])

    def _logits(self, ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, self.blocks, ids, final)[0].float()
