"""Evaluation: perplexity, KL divergence / top-1 agreement to the base model (headless encoders: embedding cosine),
in memory bounded independently of vocabulary x batch."""

from .metrics import evaluate_windows, text_windows

__all__ = ["evaluate_windows", "text_windows"]
