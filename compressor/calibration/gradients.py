"""Output gradients block by block: per-block input and output-gradient Gram statistics of a model's linears
without the whole model in memory (the Fisher factors of `allocate_bits`).

A whole-model forward + backward holds every block's weights and every block's activations at once. Here:

  1. forward, block by block (each block brought in, run on every window, let go): each block's input on every
     window is stored in a temporary file (the block-boundary activations); `observe(i, x_in, x_out)` sees every
     block's input and output (LIM scores);
  2. head: the model after the last block (final norm, head; every block replaced by a pass-through) runs on the
     last boundary, and `objective(logits, window_index)` (a scalar) is differentiated back to that boundary;
  3. backward, last block first: the block is brought in, re-run on its stored inputs with gradients on, and the
     gradient at its output pushed through it; hooks gather H (the Gram of each input group's input) and G (the
     Gram of the gradient at each linear's output), and the gradient at the block's input is the output gradient
     of the block before. Statistics are reduced over ranks, yielded, and the block let go.

Peak memory: one block's weights and float64 statistics, and two boundaries (stored inputs, gradients) of this
process's windows. Statistics are `GramStat`s (one float32 product per window, summed in float64), so they do not
depend on how windows are split among processes. Gradients are exactly those of a whole-model backward (the same
operations, block by block); forwards run under autocast when `compute_dtype` is narrower than float32.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CompressorError
from .engine import GramStat, ReduceFn, Residency, capture_block_inputs, replaying_last_block, return_free_memory


@dataclass
class BlockGrams:
    """One block's statistics, summed over every window of every process (names are block-local)."""

    index: int
    inputs: dict[str, GramStat] = field(default_factory=dict)  # input group (its first linear) -> Gram of x
    outputs: dict[str, GramStat] = field(default_factory=dict)  # linear -> Gram of d objective / d output


Objective = Callable[[torch.Tensor, int], torch.Tensor]  # (logits [tokens, vocab], window index) -> scalar
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]  # (block, input, output) of one window


class GradientSweep:
    """Block-by-block forward, then backward, over `windows` ([seq] token ids each; `indices` their positions in
    the whole calibration set, which `objective` gets so that a window's objective is the same on any process).

        sweep = GradientSweep(model, blocks, windows, indices, groups, objective, ...)
        sweep.forward(observe)          # boundaries stored; observe(i, x_in, x_out) per block and window
        for grams in sweep.backward():  # last block first, each block's BlockGrams
            ...

    `groups`: the adapter's input-sharing linear groups (block-local names); H is gathered once per group.
    `token_clip` caps H's token norms per window (`GramStat`). `reduce` (`Ranks.reduce_gram`) sums a statistic over
    the processes. `residency` brings blocks in and out (streamed models)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        windows: Sequence[torch.Tensor],
        indices: Sequence[int],
        groups: Sequence[tuple[str, ...]],
        objective: Objective,
        *,
        compute_dtype: torch.dtype = torch.float32,
        token_clip: float | None = None,
        reduce: ReduceFn | None = None,
        residency: Residency | None = None,
    ):
        self.model, self.blocks, self.groups, self.objective = model, blocks, list(groups), objective
        self.windows, self.indices = [w.reshape(1, -1) for w in windows], list(indices)
        self.compute_dtype, self.token_clip, self.reduce = compute_dtype, token_clip, reduce
        self.residency = residency or Residency()
        self._folder = tempfile.TemporaryDirectory(prefix="compressor-boundaries-")
        self._calls = None
        self._tuple_output = False

    def close(self) -> None:
        """Delete the stored boundaries and bring the embeddings and head back (a sweep leaves the model resident
        as it found it: the passes after it capture block inputs through the embeddings)."""
        self._folder.cleanup()
        self.residency.load_outside()

    # ---- 1. forward -------------------------------------------------------------------------------------
    def forward(self, observe: Observer | None = None) -> None:
        """Run every block on every window, storing each block's inputs and the last block's outputs."""
        with _frozen(self.model):
            self._calls = capture_block_inputs(self.model, self.blocks, self.windows)
        # captured under inference mode, which autograd refuses to save: plain copies for the backward's re-runs
        memo: dict[int, torch.Tensor] = {}
        self._calls.args = [[_plain(a, memo) for a in per_block] for per_block in self._calls.args]
        self._calls.kwargs = [[_plain(k, memo) for k in per_block] for per_block in self._calls.kwargs]
        self.residency.release_outside()
        hidden, self._calls.hidden = self._calls.hidden, []
        for i, block in enumerate(self.blocks):
            self.residency.load_block(i)
            self._store(i, hidden)
            outputs = []
            with torch.inference_mode(), self._autocast():
                for w, x in enumerate(hidden):
                    out = block(x, *self._calls.args[i][w], **self._calls.kwargs[i][w])
                    self._tuple_output = isinstance(out, tuple)
                    out = out[0] if self._tuple_output else out
                    if observe is not None:
                        observe(i, x, out)
                    outputs.append(out)
            self.residency.release_block(i)
            hidden = outputs
            return_free_memory()
        self._store(len(self.blocks), hidden)

    # ---- 2. head ----------------------------------------------------------------------------------------
    def _head_gradients(self) -> list[torch.Tensor]:
        """d objective / d (last block's output) per window: the model runs with every block passing its input
        through and the last one returning the stored boundary."""
        self.residency.load_outside()
        grads = []
        try:
            for x, ids, index in zip(self._load(len(self.blocks)), self.windows, self.indices):
                x = x.clone().requires_grad_(True)
                with _frozen(self.model), replaying_last_block(self.blocks, x, self._tuple_output), torch.enable_grad():
                    with self._autocast():
                        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                    self.objective(logits[0], index).backward()
                grads.append(x.grad)
        finally:
            self.residency.release_outside()
        return grads

    # ---- 3. backward ------------------------------------------------------------------------------------
    def backward(self) -> Iterator[BlockGrams]:
        """Each block's statistics, last block first (the block is resident while the caller handles them)."""
        if self._calls is None:
            raise RuntimeError("GradientSweep.backward before forward")
        grads = self._head_gradients()
        for i in reversed(range(len(self.blocks))):
            self.residency.load_block(i)
            grams = BlockGrams(i)
            handles = self._hooks(self.blocks[i], grams)
            try:
                grads = self._block_backward(i, grads)
            finally:
                for h in handles:
                    h.remove()
            if self.reduce is not None:
                for stat in (*grams.inputs.values(), *grams.outputs.values()):
                    self.reduce(stat)
            (Path(self._folder.name) / f"{i}.pt").unlink()
            yield grams
            self.residency.release_block(i)
            return_free_memory()

    def _block_backward(self, i: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block i re-run on each stored input with gradients on; the gradients at its inputs."""
        block, inputs = self.blocks[i], self._load(i)
        out_grads = []
        with _frozen(block), torch.enable_grad():
            for w, (x, g) in enumerate(zip(inputs, grads)):
                x = x.detach().requires_grad_(True)
                with self._autocast():
                    out = block(x, *self._calls.args[i][w], **self._calls.kwargs[i][w])
                out = out[0] if isinstance(out, tuple) else out
                out.backward(g.to(out.dtype))
                out_grads.append(x.grad)
                inputs[w] = None
        return out_grads

    def _hooks(self, block: nn.Module, grams: BlockGrams) -> list:
        """Forward hooks on the groups' linears: H of each group's input, and a gradient hook on each output."""
        handles = []
        for group in self.groups:
            for name in group:
                handles.append(block.get_submodule(name).register_forward_hook(self._hook(grams, name, group[0])))
        return handles

    def _hook(self, grams: BlockGrams, name: str, key: str):
        dtype, clip = self.compute_dtype, self.token_clip

        def add_output_gram(grad: torch.Tensor) -> None:
            stat = grams.outputs.get(name)
            if stat is None:
                stat = grams.outputs[name] = GramStat(grad.shape[-1], None, dtype, track_abs=False)
            stat.add(grad.detach())

        def hook(module, inputs, output):
            if name == key:  # the group's members share this input: gather it once
                x = inputs[0].detach()
                grams.inputs.setdefault(key, GramStat(x.shape[-1], clip, dtype, track_abs=False)).add(x)
            if output.requires_grad:
                output.register_hook(add_output_gram)

        return hook

    # ---- boundaries -------------------------------------------------------------------------------------
    def _store(self, i: int, tensors: list[torch.Tensor]) -> None:
        path = Path(self._folder.name) / f"{i}.pt"
        try:
            torch.save([t.detach().clone() for t in tensors], path)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its zip writer
            size = sum(t.numel() * t.element_size() for t in tensors)
            raise CompressorError(
                f"cannot store block activations ({size / 2**20:.0f} MiB per block) in {self._folder.name}: {err}",
                fix="free disk space there or point TMPDIR at a disk with room (or lower allocate_bits.num_samples)",
            ) from None

    def _load(self, i: int) -> list[torch.Tensor]:
        return torch.load(Path(self._folder.name) / f"{i}.pt", weights_only=True)

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.windows[0].device.type, dtype=self.compute_dtype)


def _plain(obj, memo: dict[int, torch.Tensor]):
    """Inference-mode tensors inside args / kwargs as plain tensors (a shared tensor stays shared via `memo`)."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_inference():
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = obj.clone()
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_plain(o, memo) for o in obj)
    if isinstance(obj, list):
        return [_plain(o, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v, memo) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """No parameter of `module` requires a gradient inside (gradients flow through activations only)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
