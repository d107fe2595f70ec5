"""Run a model's blocks on cached calibration inputs, with blocks or sublayers skipped, and score the result.

Built on `calibration.engine.capture_block_inputs`: every block's call arguments are recorded once, so the
hidden state entering block i can be carried through any subset of the later blocks without rerunning the
embeddings or the blocks before i. A *unit* is a whole block `(i, "block")` or one residual branch of it
`(i, "attention")` / `(i, "mlp")`; skipping a branch zeroes its contribution with a forward hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.engine import Residency, capture_block_inputs, head_logits
from ..models.adapters import Adapter
from .family import structure_info

REFERENCE_FP32_LIMIT = 64 * 2**20  # base log-probs kept in float32 up to this many values, float16 beyond

Unit = tuple[int, str]  # (block index, "block" | "attention" | "mlp")
Hidden = list[torch.Tensor]  # one tensor per chunk


def _out(x):
    return x[0] if isinstance(x, tuple) else x


class Capture:
    """Forward hook that keeps a module's output (and input, when asked) per call."""

    def __init__(self, module: nn.Module, inputs: bool = True):
        self.keep_inputs = inputs
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.keep_inputs:
            self.inputs.append(args[0].detach())
        self.outputs.append(_out(out).detach())

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class OutputScore:
    """Quality of final hidden states against the base model on the same tokens."""

    loss: float  # mean next-token NLL (nan for encoders)
    kl: float  # mean KL(base || this) over positions
    cosine: float  # mean cosine of final hidden states with the base model's


class BlockRunner:
    """Cached inputs of every block for a fixed set of chunks, plus the base model's outputs on them."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        chunks: Sequence[torch.Tensor],
        reference: bool = True,
        *,
        residency: Residency | None = None,
    ):
        """`residency` brings each block in for its run and lets it go after (streamed models)."""
        self.model, self.adapter = model, adapter
        self.blocks = adapter.blocks(model)
        self.chunks = list(chunks)
        self.info = structure_info(adapter, model)
        self.residency = residency or Residency()
        self._held: set[int] = set()  # blocks kept resident across runs (`holding`)
        self.calls = capture_block_inputs(model, self.blocks, self.chunks)
        self.base_p: list[torch.Tensor] | None = None  # base model's probabilities per chunk
        self.base_final: Hidden | None = None
        if reference:
            self.base_final = self.run(0, self.calls.hidden)
            self.base_p, self.base_negentropy = [], []
            half = sum(h.shape[0] * h.shape[1] for h in self.base_final) * model.config.vocab_size
            for i, h in enumerate(self.base_final):
                logp = self.log_probs(i, h)
                p = logp.exp()
                if half > REFERENCE_FP32_LIMIT:  # large vocab x many tokens: halve the cache
                    p = p.to(torch.float16)
                self.base_p.append(p)
                # KL = sum p log p - sum p log q, both terms with the p kept (so a float16 p perturbs the weights of
                # a true KL instead of leaving a difference of two large, differently rounded sums)
                self.base_negentropy.append((p.float() * logp).sum().item())

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---- running blocks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def skipping(self, units: Iterable[Unit]) -> Iterator[None]:
        """Zero the output of the named branches while inside the context."""
        handles = []
        for i, kind in units:
            if kind == "block":
                continue
            name = self.info.branch(kind)
            module = self.blocks[i].get_submodule(name)
            handles.append(module.register_forward_hook(lambda m, a, out: torch.zeros_like(_out(out))))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def run_block(self, i: int, hidden: Hidden, block: nn.Module | None = None) -> Hidden:
        """Block i (or a replacement module called like it) on every chunk's hidden state."""
        block = self.blocks[i] if block is None else block
        args, kwargs = self.calls.args[i], self.calls.kwargs[i]
        return [_out(block(h, *args[c], **kwargs[c])) for c, h in enumerate(hidden)]

    def run(self, start: int, hidden: Hidden, removed: Iterable[Unit] = (), stop: int | None = None) -> Hidden:
        """Carry `hidden` (the input of block `start`) through blocks start..stop-1, skipping `removed`."""
        removed = set(removed)
        dropped = {i for i, kind in removed if kind == "block"}
        with self.skipping(u for u in removed if u[0] >= start):
            for i in range(start, self.depth if stop is None else stop):
                if i not in dropped:
                    self.residency.load_block(i)
                    hidden = self.run_block(i, hidden)
                    if i not in self._held:
                        self.residency.release_block(i)
        return hidden

    @contextlib.contextmanager
    def holding(self, indices: Iterable[int]) -> Iterator[None]:
        """Keep blocks `indices` resident inside the context (a window being fused is read and changed across
        several runs); they are let go on leaving it (a changed parameter stays resident)."""
        held = [i for i in indices if i not in self._held]
        for i in held:
            self.residency.load_block(i)
        self._held.update(held)
        try:
            yield
        finally:
            self._held.difference_update(held)
            for i in held:
                self.residency.release_block(i)

    def inputs(
        self,
        removed: Iterable[Unit] = (),
        start: int = 0,
        known: list[Hidden] | None = None,
        last: int | None = None,
        keep: set[int] | None = None,
    ) -> list[Hidden | None]:
        """Input of every block and the final output (depth + 1 entries) with `removed` skipped.

        With `known` (a previous result), entries up to `start` are reused and only the rest is recomputed;
        with `last`, only the inputs of blocks 0..last are computed; with `keep`, only those entries are kept (the
        others are None), so at most two other boundaries are in memory at a time.
        """
        removed = set(removed)
        states = list(known[: start + 1]) if known is not None else [self.calls.hidden]
        current = states[-1]
        for i in range(len(states) - 1, self.depth if last is None else last):
            if keep is not None and i not in keep:
                states[i] = None
            current = self.run(i, current, removed, stop=i + 1)
            states.append(current)
        if keep is not None and len(states) - 1 not in keep:
            states[-1] = None
        return states

    # ---- scoring final hidden states --------------------------------------------------------------
    @torch.inference_mode()
    def log_probs(self, chunk: int, final: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the model's head applied to `final` (the last block's output) for one chunk."""
        return F.log_softmax(head_logits(self.model, self.blocks, self.chunks[chunk], final).float(), dim=-1)

    @torch.inference_mode()
    def score(self, final: Hidden, merge: Callable[[list], list] | None = None) -> OutputScore:
        """Loss, KL to the base model and final-state cosine for per-chunk final hidden states. `merge`
        (`Ranks.gather`) collects every process's per-chunk sums, added in chunk order, when the chunks are shared
        among processes."""
        assert self.base_p is not None and self.base_final is not None, "runner built without a reference"
        sums = []  # per chunk: nll, kl, cosine, predicted tokens, positions
        for c, h in enumerate(final):
            logp = self.log_probs(c, h)
            kl = self.base_negentropy[c] - (self.base_p[c] * logp).sum().item()
            cos = F.cosine_similarity(h.float(), self.base_final[c].float(), dim=-1).sum().item()
            nll, n_pred = 0.0, 0
            if self.adapter.decoder:
                ids = self.chunks[c]
                nll = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item()
                n_pred = ids.shape[0] * (ids.shape[1] - 1)
            sums.append((nll, kl, cos, n_pred, h.shape[0] * h.shape[1]))
        if merge is not None:
            sums = merge(sums)
        nll = kl = cos = 0.0
        n_pred = n_pos = 0
        for c_nll, c_kl, c_cos, c_pred, c_pos in sums:
            nll, kl, cos, n_pred, n_pos = nll + c_nll, kl + c_kl, cos + c_cos, n_pred + c_pred, n_pos + c_pos
        loss = nll / n_pred if n_pred else float("nan")
        return OutputScore(loss, kl / n_pos, cos / n_pos)


def split_rows(ids: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Chunks of `rows` windows each (small chunks keep [rows, seq, vocab] logits in memory bounds)."""
    return [ids[i : i + rows] for i in range(0, ids.shape[0], rows)]
