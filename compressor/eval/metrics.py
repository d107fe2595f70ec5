"""Quality metrics over non-overlapping token windows, base and compressed model side by side; a greedy sample."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from itertools import repeat

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .embeddings import embedding_similarity
from .logits import PROBE_TOKENS, Logits, checked_split, forward, slice_positions, window_logits


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] of the tokenized text (a short tail is dropped)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


_SUMS = ("nll", "base_nll", "kl", "agree")


@torch.inference_mode()
def evaluate_windows(
    model,
    windows: torch.Tensor,
    base_model=None,
    batch_size: int = 4,
    causal: bool = True,
    quiet: bool = False,
    share: Callable[[list], list] | None = None,
    gather: Callable[[list], list] | None = None,
) -> dict:
    """Perplexity of `model` (and `base_model`) on the windows, plus KL(base || model) and top-1 agreement; for a
    headless encoder (no logits), the cosine similarity of its embeddings to the base's (`embedding_similarity`).

    Distributed runs pass `share` (this process's part of a list: here the batches) and `gather` (every process's
    list, concatenated in rank order): each process evaluates its batches, and every window's sums are added in
    window order, so the figures are those of one process evaluating every window.

    KL and top-1 are averaged over every predicted position; perplexity is exp(mean next-token NLL). The same
    figures per window go under "windows" (the report plots them: where the compressed model loses, and how evenly).
    Memory does not grow with vocabulary x batch: logits exist for one window's slice of positions at a time
    (`logits.window_logits`); `batch_size` windows share one run of the model's body. `model` and `base_model` may
    be block-by-block logits sources (`calibration.blockwise.BlockwiseLogits`: this process's batches are run
    block-major first, then read back in order).
    """
    result = {"eval_windows": int(windows.shape[0]), "eval_tokens": int(windows.numel())}
    if windows.shape[0] == 0:
        return result
    batches = list(range(0, windows.shape[0], batch_size))
    mine_batches = share(batches) if share else batches
    if _blockwise(model):  # a model run block by block (calibration.blockwise): a decoder with logits
        for source in (model, base_model) if base_model is not None else (model,):
            source.prepare([windows[i : i + batch_size] for i in mine_batches])
        rows = slice_positions(model.vocab_size, windows.shape[1])
        logits_of = _logits_sources(model, base_model, None, None)
    else:
        probe = windows[:1, :PROBE_TOKENS]
        out = forward(model, probe)
        if getattr(out, "logits", None) is None:  # a headless encoder: its hidden states are what it gives
            return result | embedding_similarity(model, windows, base_model, batch_size, quiet)
        split = checked_split(model, probe, out.logits)
        base_split = checked_split(base_model, probe) if base_model is not None else None
        rows = slice_positions(out.logits.shape[-1], windows.shape[1])
        del out
        logits_of = _logits_sources(model, base_model, split, base_split)
    measured: list[tuple[dict, int]] = []  # each window's sums and length, in window order
    for i in tqdm(mine_batches, desc="evaluate", unit="batch", disable=quiet):
        ids = windows[i : i + batch_size]
        ours, theirs = logits_of(ids)
        for row, mine, base in zip(ids, ours, theirs):
            measured.append((_window_sums(mine, base, row[1:] if causal else None, rows, row.numel()), row.numel()))
            del mine, base  # the fallback's whole-window logits go before the next window's come
    per_window: dict[str, list[float]] = {}
    totals = dict.fromkeys(_SUMS, 0.0)
    for sums, length in gather(measured) if gather else measured:
        _add_window(per_window, totals, sums, length, base_model is not None, causal)
    return result | _totals(totals, windows, per_window, base_model is not None, causal)


def _blockwise(model) -> bool:
    """Whether `model` is a block-by-block logits source (`calibration.blockwise.BlockwiseLogits`)."""
    return hasattr(model, "prepare") and hasattr(model, "window_logits")


def _logits_sources(model, base_model, split, base_split):
    """ids -> (the model's, the base's) per-window logits functions (the base's: None each without a base)."""

    def of(source, source_split, ids: torch.Tensor):
        if source is None:
            return repeat(None)
        return source.window_logits(ids) if _blockwise(source) else window_logits(source, source_split, ids)

    return lambda ids: (of(model, split, ids), of(base_model, base_split, ids))


def _window_sums(mine: Logits, base: Logits | None, target: torch.Tensor | None, rows: int, length: int) -> dict:
    """One window's sums over its positions, `rows` at a time: NLL of the next tokens `target` (the last position
    predicts none) under the model and the base, KL(base || model) and top-1 agreements at every position."""
    sums = dict.fromkeys(_SUMS, 0.0)
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        logp = F.log_softmax(mine(start, stop), dim=-1)
        if target is not None:
            sums["nll"] += _nll(logp, target, start)
        if base is None:
            continue
        base_logp = F.log_softmax(base(start, stop), dim=-1)
        if target is not None:
            sums["base_nll"] += _nll(base_logp, target, start)
        sums["kl"] += (base_logp.exp() * (base_logp - logp)).sum().item()
        sums["agree"] += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    return sums


def _nll(logp: torch.Tensor, target: torch.Tensor, start: int) -> float:
    """Summed negative log-likelihood of positions start.. of `logp` [n, vocab] predicting `target` [S - 1]."""
    n = min(logp.shape[0], target.numel() - start)
    if n <= 0:
        return 0.0
    return -logp[:n].gather(-1, target[start : start + n].unsqueeze(-1)).sum().item()


def _add_window(per_window: dict, totals: dict, sums: dict, length: int, with_base: bool, causal: bool) -> None:
    """Add one window's sums to the run's and its figures to the per-window lists."""
    for key in _SUMS:
        totals[key] += sums[key]
    predicted = causal and length > 1  # a one-token window predicts nothing
    if predicted:
        per_window.setdefault("perplexity", []).append(math.exp(sums["nll"] / (length - 1)))
    if with_base:
        if predicted:
            per_window.setdefault("base_perplexity", []).append(math.exp(sums["base_nll"] / (length - 1)))
        per_window.setdefault("kl_divergence", []).append(sums["kl"] / length)


def _totals(totals: dict, windows: torch.Tensor, per_window: dict, with_base: bool, causal: bool) -> dict:
    """The run's figures from the summed ones: perplexities over predicted positions, KL and top-1 over all."""
    count, positions = windows.shape[0] * (windows.shape[1] - 1), windows.numel()
    result = {}
    if causal and count:
        result["perplexity"] = math.exp(totals["nll"] / count)
    if with_base:
        if causal and count:
            result["base_perplexity"] = math.exp(totals["base_nll"] / count)
        result["kl_divergence"] = totals["kl"] / positions
        result["top1_agreement"] = totals["agree"] / positions
    if per_window:
        result["windows"] = {k: [float(f"{v:.6g}") for v in values] for k, values in per_window.items()}
    return result


@torch.inference_mode()
def greedy_sample(model, tokenizer, prompt: str, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy continuation of `prompt` and the decode rate (tokens/s after the first, which pays the prefill).

    The rate comes from pairs of runs, one token and `new_tokens` tokens, so the prefill cancels out; the median
    of `repeats` pairs, so that one slow moment of the machine does not decide a comparison with the base model.
    """
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(n: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
        )
        return out[0, ids.shape[1] :], time.perf_counter() - start

    rates = []
    for _ in range(repeats):
        _, first = run(1)
        tokens, total = run(new_tokens)
        rates.append((tokens.numel() - 1) / max(total - first, 1e-9))
    return {
        "prompt": prompt,
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "new_tokens": int(tokens.numel()),
        "decode_tokens_per_s": statistics.median(rates) if tokens.numel() > 1 else None,
    }
