"""Paired bootstrap over evaluation windows: 95% intervals for a perplexity change and a mean KL.

Every window has the same number of predicted tokens, so a model's perplexity over a set of windows is
exp(mean over windows of log window-perplexity): resampling windows with replacement (the same draw for both
models, hence *paired*) gives the spread a figure would have on another text of the same kind. Seeded: the same
windows give the same interval.
"""

from __future__ import annotations

import numpy as np

SAMPLES = 2000
LEVEL = 0.95


def _draws(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def perplexity_change_interval(
    window_ppl: list[float], base_window_ppl: list[float], samples: int = SAMPLES, seed: int = 0, level: float = LEVEL
) -> list[float]:
    """Interval of the relative perplexity change ppl/base_ppl - 1 (0.05 = 5% worse), windows paired."""
    logs, base_logs = np.log(np.asarray(window_ppl)), np.log(np.asarray(base_window_ppl))
    idx = _draws(len(logs), samples, seed)
    return _interval(np.exp(logs[idx].mean(1) - base_logs[idx].mean(1)) - 1, level)


def mean_interval(values: list[float], samples: int = SAMPLES, seed: int = 0, level: float = LEVEL) -> list[float]:
    """Interval of the mean of per-window values (e.g. KL divergence)."""
    v = np.asarray(values, dtype=np.float64)
    return _interval(v[_draws(len(v), samples, seed)].mean(1), level)


def increase_difference_interval(
    a_window_ppl: list[float],
    b_window_ppl: list[float],
    base_window_ppl: list[float],
    samples: int = SAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> list[float]:
    """Interval of (ppl_a - ppl_b) / ppl_base: how much more method A raises perplexity than method B, as a fraction
    of the base (negative: A is better), all three models on the same windows. Excluding 0 means the ranking
    holds beyond the spread of the text."""
    a, b, base = (np.log(np.asarray(v)) for v in (a_window_ppl, b_window_ppl, base_window_ppl))
    idx = _draws(len(a), samples, seed)
    base_ppl = np.exp(base[idx].mean(1))
    return _interval((np.exp(a[idx].mean(1)) - np.exp(b[idx].mean(1))) / base_ppl, level)


def difference_interval(
    a_values: list[float], b_values: list[float], samples: int = SAMPLES, seed: int = 0, level: float = LEVEL
) -> list[float]:
    """Interval of mean(a) - mean(b) of paired per-window values (e.g. KL of two methods)."""
    d = np.asarray(a_values, dtype=np.float64) - np.asarray(b_values, dtype=np.float64)
    return _interval(d[_draws(len(d), samples, seed)].mean(1), level)


def excludes_zero(interval: list[float]) -> bool:
    """Whether a difference's interval lies wholly on one side of 0 (a ranking the text supports)."""
    return interval[0] > 0 or interval[1] < 0


def report_intervals(windows: dict[str, list[float]], seed: int = 0) -> dict:
    """The intervals of one run against its base model from evaluate_windows' per-window figures (what is there)."""
    out: dict = {"level": LEVEL, "samples": SAMPLES, "seed": seed, "over": "windows (paired bootstrap)"}
    ppl, base = windows.get("perplexity"), windows.get("base_perplexity")
    if ppl and base and len(ppl) == len(base) and len(ppl) > 1:
        out["perplexity_change"] = perplexity_change_interval(ppl, base, seed=seed)
    for key in ("kl_divergence", "embedding_cosine"):  # a decoder's KL, a headless encoder's cosine to the base
        values = windows.get(key)
        if values and len(values) > 1:
            out[key] = mean_interval(values, seed=seed)
    return out if len(out) > 4 else {}


def interval_parts(ci: dict, pct_digits: int = 1, kl_digits: int = 4) -> list[str]:
    """The intervals of `report_intervals` as text: perplexity change (in %), KL, embedding cosine."""
    parts = []
    if "perplexity_change" in ci:
        lo, hi = ci["perplexity_change"]
        parts.append(f"perplexity change [{lo * 100:+.{pct_digits}f}%, {hi * 100:+.{pct_digits}f}%]")
    if "kl_divergence" in ci:
        lo, hi = ci["kl_divergence"]
        parts.append(f"KL [{lo:.{kl_digits}f}, {hi:.{kl_digits}f}]")
    if "embedding_cosine" in ci:
        lo, hi = ci["embedding_cosine"]
        parts.append(f"embedding cosine [{lo:.6f}, {hi:.6f}]")
    return parts


def interval_text(windows: dict[str, list[float]], seed: int = 0) -> str:
    """One table cell's worth: the 95% intervals of a run against its base, from its per-window figures."""
    return " ".join(interval_parts(report_intervals(windows, seed))) or "-"
