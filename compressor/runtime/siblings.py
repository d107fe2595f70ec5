"""Sibling linears (q|k|v, gate|up: linears that read the same input) run as one kernel call when decoding.

A decode step of a small model is dominated by per-call costs (the Python module call, the op dispatch, the
activation quantization, the threads' fork and join), not by reading weights: SmolLM2 makes 7 weight calls per
block, 210 per token. Siblings with the same kernel format are concatenated along N once, at load time; the first
sibling called with an input runs the concatenated weight and keeps the others' rows for them, so a llama block
makes 4 calls instead of 7. Each row is computed exactly as the sibling's own call would (the kernels compute rows
independently, and siblings share the activation quantization because they share K and the group size), so the
outputs are bit-identical. Low-rank corrections (a LoRA compensation) share their down product too (the downs
stacked, one product for the group; each sibling then adds its own up product to its rows).

Memory: the concatenated weight owns the codes; each sibling's own kernel weight becomes a view of its rows (only
its scales are its own copy, since the kernels take contiguous [G, N] scales), so a sibling still runs alone, e.g.
under torch.compile, which calls each module's own weight (the cache below is eager-mode state).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import packed_matmul
from .repack import STREAM_ROWS, PackedWeight


def _fusible(packs: list[PackedWeight]) -> bool:
    first = packs[0]
    return all(
        p.kind == first.kind
        and p.group_size == first.group_size
        and p.in_features == first.in_features
        and p.scale.dtype == first.scale.dtype
        and p.scale.shape[0] == first.scale.shape[0]
        and (p.zs is None) == (first.zs is None)
        and p.w.device == first.w.device
        for p in packs
    )


class SiblingGroup:
    """The concatenated kernel weight of sibling QuantLinears, and the outputs of the last input they were given."""

    def __init__(self, packs: list[PackedWeight], corrections: list[tuple[torch.Tensor, torch.Tensor] | None]):
        self.packed = PackedWeight(
            packs[0].kind,
            torch.cat([p.w for p in packs]),
            torch.cat([p.scale for p in packs], dim=1),
            None if packs[0].zs is None else torch.cat([p.zs for p in packs], dim=1),
            packs[0].group_size,
            sum(p.scale.shape[1] for p in packs),  # padded widths: every sibling starts on a stream
            packs[0].in_features,
        )
        starts = [0]
        for p in packs[:-1]:
            starts.append(starts[-1] + p.scale.shape[1])
        self.rows = [(s, p.out_features) for s, p in zip(starts, packs)]
        # the siblings' correction downs stacked [sum r, K]: one product serves them all; each sibling applies
        # its own up to its slice (a block-diagonal up would read mostly zeros: the factors are float)
        given = [c for c in corrections if c is not None]
        self.downs = torch.cat([down for down, _ in given]) if given else None
        self.down_sources = [None if c is None else c[0] for c in corrections]  # (a sibling checks its own is one)
        self.down_rows, start = [], 0
        for c in corrections:
            self.down_rows.append(None if c is None else (start, c[0].shape[0]))
            start += 0 if c is None else c[0].shape[0]
        self._low: torch.Tensor | None = None
        self._input: torch.Tensor | None = None
        self._mode = -1
        self._output: torch.Tensor | None = None
        self._waiting: set[int] = set()

    def member_view(self, index: int, own: PackedWeight) -> PackedWeight:
        """Sibling `index`'s kernel weight with its codes a view of the concatenated ones (scales stay its own)."""
        start, _ = self.rows[index]
        w = self.packed.w[start // STREAM_ROWS : (start + own.scale.shape[1]) // STREAM_ROWS]
        return PackedWeight(own.kind, w, own.scale, own.zs, own.group_size, own.out_features, own.in_features)

    def output(self, index: int, x: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sibling `index`'s float32 [M, N] product with x [.., K], and its correction's down product (or None):
        from the last call when that call had this same input tensor and mode and this sibling has not taken its
        rows yet, else one call for all."""
        if x is not self._input or mode != self._mode or index not in self._waiting:
            self._input, self._mode = x, mode
            x2d = x.reshape(-1, x.shape[-1])
            self._output = packed_matmul(x2d, self.packed, mode)
            self._low = None if self.downs is None else x2d.to(self.downs.dtype) @ self.downs.t()
            self._waiting = set(range(len(self.rows)))
        out, low = self._output, self._low
        self._waiting.discard(index)
        if not self._waiting:  # every sibling has its rows: drop the references
            self._input = self._output = self._low = None
        start, n = self.rows[index]
        return out[:, start : start + n], _slice(low, self.down_rows[index])


def _slice(low: torch.Tensor | None, rows: tuple[int, int] | None) -> torch.Tensor | None:
    return None if low is None or rows is None else low[:, rows[0] : rows[0] + rows[1]]


def fuse_siblings(groups: list[list[nn.Module]]) -> int:
    """Make a SiblingGroup of every list of QuantLinears in `groups` whose kernel weights can be concatenated (same
    format, group size, input width and scale dtype); returns how many groups were made."""
    made = 0
    for members in groups:
        if len(members) < 2:
            continue
        packs = [m.packed_weight() if m.use_kernels else None for m in members]
        corrections = [None if m.lora_down is None else (m.lora_down, m.lora_up) for m in members]
        if any(p is None for p in packs) or not _fusible(packs) or len({c[0].dtype for c in corrections if c}) > 1:
            continue
        group = SiblingGroup(packs, corrections)
        for i, (m, own) in enumerate(zip(members, packs)):
            m.join_siblings(group, i, group.member_view(i, own))
        made += 1
    return made
