"""Headless encoders (sentence-embedding models): how close the compressed model's embeddings stay to the base's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .logits import forward


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states [B, S, H] over the positions the attention mask [B, S] keeps: [B, H]."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def _embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    return mean_pool(forward(model, ids).last_hidden_state.float(), torch.ones_like(ids))


@torch.inference_mode()
def embedding_similarity(model, windows: torch.Tensor, base_model, batch_size: int = 4, quiet: bool = False) -> dict:
    """Cosine similarity of the mean-pooled last hidden states of `model` and `base_model` on each window:
    `embedding_cosine` (mean over windows), `embedding_cosine_min`, and the per-window values under "windows".
    Empty without a base model (there is nothing to compare with)."""
    if base_model is None or windows.shape[0] == 0:
        return {}
    cosines: list[float] = []
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="evaluate", unit="batch", disable=quiet):
        ids = windows[i : i + batch_size]
        cosines += F.cosine_similarity(_embeddings(model, ids), _embeddings(base_model, ids), dim=-1).tolist()
    return {
        "embedding_cosine": sum(cosines) / len(cosines),
        "embedding_cosine_min": min(cosines),
        "windows": {"embedding_cosine": [float(f"{v:.6g}") for v in cosines]},
    }
