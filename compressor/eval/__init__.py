"""Evaluation: perplexity, KL divergence / top-1 agreement to the base model, size."""

from .metrics import evaluate_windows, text_windows

__all__ = ["evaluate_windows", "text_windows"]
