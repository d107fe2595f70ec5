"""A model's float32 logits, one window and a few positions at a time: evaluation in bounded memory.

The model's body (its `base_model`, which ends with the final norm) runs once per batch of windows; the head
(`lm_head`, then the final logit softcap where the config has one) runs on a slice of one window's positions, so
no tensor holds batch x sequence x vocabulary logits. A model whose logits that split does not reproduce on a
short probe (a head with a transform before the vocabulary projection, as BERT's masked-LM head, or remote code)
runs whole, one window at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

SLICE_ELEMENTS = 1 << 22  # logits per slice (16 MiB in float32): 16 positions of a 262k vocabulary, 128 of 32k
PROBE_TOKENS = 16  # positions of the first window on which a split must reproduce the model's own logits
SPLIT_TOLERANCE = 1e-4  # |difference| <= tol + tol * |logit|: float rounding, not a different head

Logits = Callable[[int, int], torch.Tensor]  # (start, stop) -> float32 logits [stop - start, vocab] of one window


def forward(model, ids: torch.Tensor):
    """The model's output on full windows `ids` [B, S] (no padding, no cache)."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def slice_positions(vocab: int, seq_len: int) -> int:
    """Positions per head slice: SLICE_ELEMENTS logits, at least one position, at most the window."""
    return max(1, min(seq_len, SLICE_ELEMENTS // max(vocab, 1)))


@dataclass(frozen=True)
class SplitHead:
    """A language model as its body (input ids -> last hidden states) and its head (hidden states -> logits)."""

    body: nn.Module
    head: nn.Module
    softcap: float | None = None  # gemma's final logit softcapping: cap * tanh(logits / cap)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return forward(self.body, ids).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden)
        if self.softcap:  # in the head's dtype, as the model's own forward does
            out = torch.tanh(out / self.softcap) * self.softcap
        return out.float()


def split_head(model) -> SplitHead | None:
    """The model as body + `lm_head` when it is built that way (its output embeddings are its `lm_head` and it has
    a base model); None otherwise. Not yet checked against the model's own logits: see `checked_split`."""
    if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
        return None
    head, body = model.get_output_embeddings(), getattr(model, "base_model", model)
    if head is None or body is model or getattr(model, "lm_head", None) is not head:
        return None
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return SplitHead(body, head, getattr(text_config, "final_logit_softcapping", None))


def checked_split(model, probe: torch.Tensor, expected: torch.Tensor | None = None) -> SplitHead | None:
    """`split_head(model)` if it gives the model's own logits `expected` on the ids `probe` (None: computed here,
    only when there is a split to check), else None."""
    split = split_head(model)
    if split is None:
        return None
    if expected is None:
        expected = forward(model, probe).logits
    out = forward(split.body, probe)
    if getattr(out, "last_hidden_state", None) is None:
        return None
    got, expected = split.logits(out.last_hidden_state), expected.float()
    if got.shape != expected.shape:
        return None
    return split if bool(((got - expected).abs() <= SPLIT_TOLERANCE * (1 + expected.abs())).all()) else None


def window_logits(model, split: SplitHead | None, ids: torch.Tensor) -> Iterator[Logits]:
    """For each window of `ids` [B, S], in order: its logits, a slice of positions at a time.

    With a split the body runs once on the batch (hidden states [B, S, hidden]) and the head runs on each slice
    asked for; without one, the whole model runs on one window (logits [S, vocab]) when its turn comes.
    """
    if split is not None:
        hidden = split.hidden(ids)
        for b in range(ids.shape[0]):  # the head sees [1, positions, hidden], as in the model's own forward
            yield lambda start, stop, b=b: split.logits(hidden[b : b + 1, start:stop])[0]
        return
    for b in range(ids.shape[0]):
        full = forward(model, ids[b : b + 1]).logits[0]
        yield lambda start, stop, full=full: full[start:stop].float()
        del full  # one window's logits alive at a time (the caller drops its handle before asking for the next)
