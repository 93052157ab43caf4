"""The report's uncertainty: the two-level bootstrap, the paired permutation test and Holm's
correction, checked against scipy where scipy does the same job."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from harness.reports.stats import holm, paired_differences, paired_p_value, two_level_interval


def test_with_one_seed_the_interval_is_scipys_percentile_bootstrap():
    values = (np.random.default_rng(1).random(400) < 0.6).astype(float)  # hit@1 of 400 queries
    ours = two_level_interval([values], resamples=9999)
    ref = sps.bootstrap((values,), np.mean, n_resamples=9999, method="percentile", random_state=0)
    ci = ref.confidence_interval
    assert ours == pytest.approx((ci.low, ci.high), abs=0.006)  # Monte Carlo error of both


def test_the_interval_widens_with_the_spread_of_the_seeds_and_is_reproducible():
    rng = np.random.default_rng(2)
    same = [rng.random(300) for _ in range(3)]
    spread = [v + shift for v, shift in zip(same, (-0.1, 0.0, 0.1))]
    low, high = two_level_interval(same)
    wide_low, wide_high = two_level_interval(spread)
    assert wide_high - wide_low > 2 * (high - low)
    assert low < np.mean([v.mean() for v in same]) < high
    assert two_level_interval(spread) == (wide_low, wide_high)  # fixed seed: same bytes


def test_the_sign_flip_test_is_scipys_paired_permutation_test():
    rng = np.random.default_rng(3)
    a = rng.random(200)
    b = a - 0.03 + rng.normal(0, 0.2, 200)
    ours = paired_p_value(a - b, resamples=9999)
    ref = sps.permutation_test(
        (a, b), lambda x, y: np.mean(x - y), permutation_type="samples", n_resamples=9999, random_state=0
    ).pvalue
    assert ours == pytest.approx(ref, abs=0.02)
    assert paired_p_value(np.zeros(50)) == 1.0  # identical methods
    assert paired_p_value(np.full(100, 0.1)) < 0.001  # always better


def test_holm_matches_the_step_down_rule():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # monotone: never below an earlier step


def test_pairs_are_the_same_query_of_the_same_seed():
    a = pd.DataFrame({"seed": [0, 0, 1], "query": [1, 2, 1], "hit_at_1": [1.0, 0.0, 1.0]})
    b = pd.DataFrame({"seed": [1, 0, 0], "query": [1, 2, 3], "hit_at_1": [0.0, 1.0, 1.0]})
    assert sorted(paired_differences(a, b, "hit_at_1").tolist()) == [-1.0, 1.0]
