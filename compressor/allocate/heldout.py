"""End-to-end KL on held-out calibration windows of the model with some linears' weights swapped in.

The one place that measures "what does this weight change do to the output distribution": `method: search` scores
its candidate mixes with it, and the allocation check scores its probe linears and the uniform allocations a mix
must beat. Held-out windows are the calibration rows after the sensitivity sweep's first `num_samples`.

Block by block (`structure.runner.BlockRunner`): the unchanged model's input of every block on the held-out windows
is kept once, so a measurement starts at the first block it changes; each block is brought in (streamed models),
its swaps are made while it is resident, the windows go through it, and its original weights go back before the
next block. The KL takes the head over a slice of one window's positions at a time, for the base model too (its
probabilities are recomputed from its kept last-block outputs rather than stored). Peak memory: one block, the
held-out windows' hidden states at every block boundary, one slice of logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.engine import Residency, head_logits
from ..calibration.ranks import ONE_PROCESS, Ranks
from ..eval.logits import slice_positions
from ..quant.linalg import fixed_order_sum
from ..structure.runner import BlockRunner

BlockStep = Callable[[int], None]  # called with block i resident, before the windows go through it: makes its swaps


def held_out_rows(ids: torch.Tensor, num_samples: int, samples: int) -> torch.Tensor:
    """`samples` calibration windows after the first `num_samples` (the sweep's); when there are too few rows,
    the last `samples` rows (which then overlap the sweep's)."""
    start = min(num_samples, max(ids.shape[0] - samples, 0))
    return ids[start : start + samples]


class HeldOutKL:
    """KL(unquantized || swapped) per token on held-out windows; a context manager.

    Entering runs the model as it is (it must be unquantized) once for the reference distribution and every
    block's input. `kl_by_block(step)` measures with the swaps `step(i)` makes in block i (through `swap`, which
    also reads `original`, both valid while that block is resident); `kl(weight_for)` swaps `weight_for(name)` for
    each linear of `names`. Originals are copied when first swapped (the adapter's weights can share the
    parameters' storage) and put back after their block has run.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter,
        names: Sequence[str],
        held: torch.Tensor,
        residency: Residency | None = None,
        ranks: Ranks = ONE_PROCESS,
    ) -> None:
        self.model, self.adapter, self.held, self.ranks = model, adapter, held, ranks
        self.modules = {n: model.get_submodule(n) for n in names}
        self.residency = residency or Residency()
        prefixes = adapter.block_prefixes(model)
        self.block_of = {n: next(i for i, p in enumerate(prefixes) if n.startswith(p + ".")) for n in names}
        self._saved: dict[str, torch.Tensor] = {}
        self._runner: BlockRunner | None = None
        self._base_states: list[list[torch.Tensor]] = []  # the unchanged model's input of every block, and output

    @property
    def samples(self) -> int:
        return int(self.held.shape[0])

    def __enter__(self) -> HeldOutKL:
        # one window per chunk (bounded head memory); in a distributed run each process takes its share
        windows = self.ranks.shard([self.held[i : i + 1] for i in range(self.samples)], allow_empty=True)
        self._runner = BlockRunner(self.model, self.adapter, windows, reference=False, residency=self.residency)
        self._base_states = self._runner.inputs()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        self._runner, self._base_states = None, []

    def linears_of(self, block: int) -> list[str]:
        """The measured linears of block `block`, in the order they were given."""
        return [n for n in self.modules if self.block_of[n] == block]

    def original(self, name: str) -> torch.Tensor:
        """The unswapped [out, in] float32 weight of linear `name` (do not modify it)."""
        saved = self._saved.get(name)
        return saved if saved is not None else self.adapter.get_weight(self.modules[name])

    def swap(self, name: str, w: torch.Tensor) -> None:
        """Put weight w [out, in] in place of linear `name`'s (its original kept until its block has run)."""
        module = self.modules[name]
        if name not in self._saved:
            self._saved[name] = self.adapter.get_weight(module).clone()
        self.adapter.set_weight(module, w)

    def kl(self, weight_for: Callable[[str], torch.Tensor | None], names: Sequence[str] | None = None) -> float:
        """Mean per-token KL with each linear's weight `weight_for(name)` (None: the original) swapped in. With
        `names` (the only linears `weight_for` changes) the blocks before the first of them are not re-run."""
        start = min((self.block_of[n] for n in names), default=0) if names is not None else 0

        def step(i: int) -> None:
            for name in self.linears_of(i):
                w = weight_for(name)
                if w is not None:
                    self.swap(name, w)

        return self.kl_by_block(step, start)

    def kl_by_block(self, step: BlockStep, start: int = 0) -> float:
        """Mean per-token KL with the swaps `step(i)` makes in each block i >= `start` (the blocks before it as
        they are); every block's original weights are back when this returns."""
        runner = self._runner
        if runner is None:
            raise RuntimeError("HeldOutKL used outside its `with` block")
        hidden = self._base_states[start]
        for i in range(start, runner.depth):
            self.residency.load_block(i)
            try:
                step(i)
                hidden = runner.run_block(i, hidden)
            finally:
                self.restore()
            self.residency.release_block(i)
        return self._kl_to_base(hidden)

    def _kl_to_base(self, final: list[torch.Tensor]) -> float:
        """Mean per-token KL(base || model) from the last block's outputs, the head applied to a slice of one
        window's positions at a time for both (no [windows, positions, vocabulary] tensor is kept or made). The
        slices' sums of every process are added in window order, so the figure does not depend on the split."""
        runner, parts = self._runner, []
        vocab = self.model.config.get_text_config().vocab_size
        for ids, ours, base in zip(runner.chunks, final, self._base_states[-1]):
            step = slice_positions(vocab, ids.shape[1])
            for start in range(0, ids.shape[1], step):
                cut = slice(start, start + step)
                theirs = _log_probs(self.model, self.adapter, ids[:, cut], base[:, cut])
                mine = _log_probs(self.model, self.adapter, ids[:, cut], ours[:, cut])
                parts.append((fixed_order_sum(theirs.exp() * (theirs - mine)), theirs.shape[0] * theirs.shape[1]))
        total, count = 0.0, 0
        for part, n in self.ranks.gather(parts):
            total, count = total + part, count + n
        return total / max(count, 1)

    def restore(self) -> None:
        """Every swapped linear back to its original weight."""
        for name in list(self._saved):
            self.adapter.set_weight(self.modules[name], self._saved.pop(name))


def _log_probs(model: nn.Module, adapter, ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities [windows, positions, vocab] the head gives the last block's outputs `final` (the
    post-block code acts on each position alone, so a slice of positions gives that slice of the logits)."""
    return F.log_softmax(head_logits(model, adapter.blocks(model), ids, final).float(), dim=-1)
