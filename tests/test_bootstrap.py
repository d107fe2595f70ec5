"""Paired bootstrap intervals over evaluation windows (compressor/eval/bootstrap.py)."""

import math

import numpy as np
import pytest

from compressor.eval.bootstrap import (
    difference_interval,
    excludes_zero,
    increase_difference_interval,
    mean_interval,
    perplexity_change_interval,
    report_intervals,
)


def _windows(n=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(3.0, 0.4, n))  # window perplexities around 20, spread as real text spreads them
    return base


def test_a_constant_change_has_a_point_interval():
    base = _windows()
    lo, hi = perplexity_change_interval(list(base * 1.1), list(base))
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert perplexity_change_interval(list(base), list(base)) == [pytest.approx(0.0), pytest.approx(0.0)]


def test_pairing_removes_the_spread_of_the_text():
    """Windows differ far more from each other than the two models differ on a window: pairing keeps the interval
    of a small change tight (unpaired resampling would swamp it)."""
    base = _windows()
    rng = np.random.default_rng(1)
    model = base * np.exp(rng.normal(0.05, 0.01, base.size))
    lo, hi = perplexity_change_interval(list(model), list(base))
    point = math.exp(np.log(model).mean() - np.log(base).mean()) - 1
    assert lo < point < hi and lo > 0.045 and hi < 0.056
    assert excludes_zero([lo, hi])


def test_seeded_and_mean_interval():
    values = list(np.random.default_rng(2).exponential(0.2, 50))
    assert mean_interval(values, seed=3) == mean_interval(values, seed=3)
    lo, hi = mean_interval(values)
    assert lo < np.mean(values) < hi


def test_method_differences():
    base = _windows()
    rng = np.random.default_rng(4)
    better = base * np.exp(rng.normal(0.05, 0.01, base.size))
    worse = base * np.exp(rng.normal(0.10, 0.01, base.size))
    interval = increase_difference_interval(list(better), list(worse), list(base))
    assert interval[1] < 0 and excludes_zero(interval)  # the first raises perplexity less
    same = increase_difference_interval(list(better), list(better * np.exp(rng.normal(0, 0.01, base.size))), list(base))
    assert not excludes_zero(same)
    kl_a, kl_b = rng.exponential(0.1, 64), rng.exponential(0.1, 64)
    assert not excludes_zero(difference_interval(list(kl_a), list(kl_b)))
    assert excludes_zero(difference_interval(list(kl_a + 0.05), list(kl_a)))


def test_report_intervals_from_evaluate_windows_figures():
    base = _windows(8)
    windows = {"perplexity": list(base * 1.02), "base_perplexity": list(base), "kl_divergence": [0.1] * 8}
    out = report_intervals(windows)
    assert out["perplexity_change"] == [pytest.approx(0.02), pytest.approx(0.02)]
    assert out["kl_divergence"] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert out["level"] == 0.95
    assert report_intervals({"perplexity": [3.0]}) == {}  # one window, no base: nothing to say
