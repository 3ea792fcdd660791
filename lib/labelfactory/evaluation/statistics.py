"""Summary statistics and paired tests for repeated experiments (seeds, label draws, patients).

Every spread is the SAMPLE standard deviation (ddof=1): the runs are a sample of the seeds and draws one could
have made, not the whole population. Intervals are two-sided 95% unless asked otherwise; NaN values (a class or
patient without a score) are left out before anything is computed, and a paired test drops a pair where either
side is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def finite(values: Sequence[float]) -> np.ndarray:
    """(n,) float64 array of the finite entries of values."""
    v = np.asarray(values, dtype=float).reshape(-1)
    return v[np.isfinite(v)]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof=1) of the finite values; SD is NaN for fewer than 2 values, both NaN for none."""
    v = finite(values)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean: mean -+ t_{(1+level)/2, n-1} * sd / sqrt(n); NaNs for n < 2."""
    v = finite(values)
    if len(v) < 2:
        return float("nan"), float("nan")
    m, sd = mean_sd(v)
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    return m - half, m + half


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean (resampling the values with replacement; fixed seed)."""
    v = finite(values)
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of a against b (same units in the same order, e.g. patient x draw).

    Returns {"n", "mean_diff" (a - b), "t_p" (two-sided paired t), "wilcoxon_p" (two-sided signed-rank;
    NaN when every difference is 0 or n < 2)}.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    d = x - y
    out = {"n": int(len(d)), "mean_diff": float(d.mean()) if len(d) else float("nan")}
    if len(d) < 2:
        return out | {"t_p": float("nan"), "wilcoxon_p": float("nan")}
    out["t_p"] = float(stats.ttest_rel(x, y).pvalue) if d.std() > 0 else (1.0 if d.mean() == 0 else 0.0)
    out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue) if np.any(d != 0) else float("nan")
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (NaN stays NaN and does not count as a test).

    Sorted ascending, p_(i) becomes max_{j<=i} min(1, (m - j + 1) p_(j)) for m tests.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def summary(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """{"n", "mean", "sd" (sample), "ci_t": [lo, hi], "ci_boot": [lo, hi]} of the finite values."""
    m, sd = mean_sd(values)
    return {
        "n": int(len(finite(values))),
        "mean": m,
        "sd": sd,
        "ci_t": list(t_interval(values, level)),
        "ci_boot": list(bootstrap_interval(values, level)),
    }
