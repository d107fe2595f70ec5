"""Quality metrics over non-overlapping token windows, base and compressed model side by side; a greedy sample."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] of the tokenized text (a short tail is dropped)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float()


@torch.inference_mode()
def evaluate_windows(
    model,
    windows: torch.Tensor,
    base_model=None,
    batch_size: int = 4,
    causal: bool = True,
    quiet: bool = False,
) -> dict:
    """Perplexity of `model` (and `base_model`) on the windows, plus KL(base || model) and top-1 agreement.

    KL and top-1 are averaged over every predicted position; perplexity is exp(mean next-token NLL). The same
    figures per window go under "windows" (the report plots them: where the compressed model loses, and how evenly).
    """
    nll = base_nll = kl = agree = 0.0
    count = 0
    per_window: dict[str, list[float]] = {}
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="evaluate", unit="batch", disable=quiet):
        ids = windows[i : i + batch_size]
        logits = _logits(model, ids)
        logp = F.log_softmax(logits, dim=-1)
        if causal:
            pred, target = logp[:, :-1], ids[:, 1:]
            token_nll = -pred.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll += token_nll.sum().item()
            per_window.setdefault("perplexity", []).extend(token_nll.mean(-1).exp().tolist())
        if base_model is not None:
            base_logp = F.log_softmax(_logits(base_model, ids), dim=-1)
            if causal:
                base_token_nll = -base_logp[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                base_nll += base_token_nll.sum().item()
                per_window.setdefault("base_perplexity", []).extend(base_token_nll.mean(-1).exp().tolist())
            token_kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
            kl += token_kl.sum().item()
            per_window.setdefault("kl_divergence", []).extend(token_kl.mean(-1).tolist())
            agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    positions = windows.numel()
    result = {"eval_windows": int(windows.shape[0]), "eval_tokens": int(positions)}
    if causal and count:
        result["perplexity"] = math.exp(nll / count)
    if base_model is not None and positions:
        if causal and count:
            result["base_perplexity"] = math.exp(base_nll / count)
        result["kl_divergence"] = kl / positions
        result["top1_agreement"] = agree / positions
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
