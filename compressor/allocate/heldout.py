"""End-to-end KL on held-out calibration windows of the model with some linears' weights swapped in.

The one place that measures "what does this weight change do to the output distribution": `method: search` scores
its candidate mixes with it, and the allocation check scores its probe linears and the uniform allocations a mix
must beat. Held-out windows are the calibration rows after the sensitivity sweep's first `num_samples`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def held_out_rows(ids: torch.Tensor, num_samples: int, samples: int) -> torch.Tensor:
    """`samples` calibration windows after the first `num_samples` (the sweep's); when there are too few rows,
    the last `samples` rows (which then overlap the sweep's)."""
    start = min(num_samples, max(ids.shape[0] - samples, 0))
    return ids[start : start + samples]


class HeldOutKL:
    """KL(unquantized || swapped) per token on held-out windows; a context manager that restores every weight.

    Entering runs the model as it is (it must be unquantized) once for the reference distribution. Each `kl` call
    puts the weights it is given in place (every other linear of `modules` back to its original) and measures;
    `swap` and `current_kl` do the same a linear at a time. Originals are copied when first swapped (the adapter's
    weights can share the parameters' storage).
    """

    def __init__(self, model: nn.Module, adapter, modules: dict[str, nn.Module], held: torch.Tensor) -> None:
        self.model, self.adapter, self.modules, self.held = model, adapter, modules, held
        self._saved: dict[str, torch.Tensor] = {}
        self._base: torch.Tensor | None = None

    @property
    def samples(self) -> int:
        return int(self.held.shape[0])

    def __enter__(self) -> HeldOutKL:
        self._base = self._log_probs()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        self._base = None

    def original(self, name: str) -> torch.Tensor:
        """The unswapped [out, in] float32 weight of linear `name` (do not modify it)."""
        saved = self._saved.get(name)
        return saved if saved is not None else self.adapter.get_weight(self.modules[name])

    def kl(self, weight_for: Callable[[str], torch.Tensor | None]) -> float:
        """Mean per-token KL with each linear's weight `weight_for(name)` (None: the original) swapped in."""
        for name in self.modules:
            w = weight_for(name)
            if w is None:
                self._put_back(name)
            else:
                self.swap(name, w)
        return self.current_kl()

    def swap(self, name: str, w: torch.Tensor) -> None:
        """Put weight w [out, in] in place of linear `name`'s (its original kept for `restore`)."""
        module = self.modules[name]
        if name not in self._saved:
            self._saved[name] = self.adapter.get_weight(module).clone()
        self.adapter.set_weight(module, w)

    def current_kl(self) -> float:
        """Mean per-token KL with the weights as they are now."""
        logp, base = self._log_probs(), self._base
        return float((base.exp() * (base - logp)).sum(-1).mean())

    def restore(self) -> None:
        """Every swapped linear back to its original weight."""
        for name in list(self._saved):
            self._put_back(name)

    def _put_back(self, name: str) -> None:
        saved = self._saved.pop(name, None)
        if saved is not None:
            self.adapter.set_weight(self.modules[name], saved)

    def _log_probs(self) -> torch.Tensor:
        with torch.inference_mode():
            held = self.held
            out = self.model(input_ids=held, attention_mask=torch.ones_like(held), use_cache=False)
            return F.log_softmax(out.logits.float(), dim=-1)
