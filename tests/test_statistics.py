"""Sample SD, t and bootstrap intervals, paired tests and Holm correction, on hand-checkable values."""

import math

import pytest

from labelfactory.evaluation.statistics import bootstrap_interval, holm, mean_sd, paired_test, summary, t_interval


def test_mean_sd_uses_the_sample_sd_and_skips_nan():
    assert mean_sd([1.0, 2.0, 3.0, float("nan")]) == pytest.approx((2.0, 1.0))  # var = (1 + 0 + 1) / 2
    m, sd = mean_sd([4.0])
    assert m == 4.0 and math.isnan(sd)
    assert all(math.isnan(v) for v in mean_sd([]))


def test_t_interval_matches_the_t_table():
    # n = 3, mean 2, sd 1: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert all(math.isnan(v) for v in t_interval([1.0]))


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    lo, hi = bootstrap_interval(values)
    assert 0.1 <= lo < 0.3 < hi <= 0.5
    assert bootstrap_interval(values) == (lo, hi)  # fixed seed
    assert bootstrap_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))


def test_paired_test_on_constant_and_known_differences():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, df 2 -> two-sided p = 0.074180
    r = paired_test([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r["n"] == 3 and r["mean_diff"] == pytest.approx(2.0)
    assert r["t_p"] == pytest.approx(0.074180, abs=1e-5)
    assert r["wilcoxon_p"] == pytest.approx(0.25)  # exact: all 3 ranks positive, 2 / 2^3
    nan_pair = paired_test([1.0, float("nan"), 3.0], [0.0, 5.0, 2.0])
    assert nan_pair["n"] == 2 and nan_pair["mean_diff"] == pytest.approx(1.0) and nan_pair["t_p"] == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0], [1.0, 2.0])


def test_holm_multiplies_by_the_remaining_tests_and_keeps_order():
    # sorted 0.01, 0.02, 0.04 -> 0.03, 0.04, max(0.04, 0.04) = 0.04; input order kept, NaN untouched
    adjusted = holm([0.04, 0.01, float("nan"), 0.02])
    assert adjusted[:2] == pytest.approx([0.04, 0.03]) and adjusted[3] == pytest.approx(0.04)
    assert math.isnan(adjusted[2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_summary_collects_everything():
    s = summary([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    assert s["ci_t"][0] < s["ci_boot"][0] <= 2.0 <= s["ci_boot"][1] < s["ci_t"][1]
