"""The comparison statistics against hand computations: exact sign-test tails, bootstrap intervals, verdicts."""

from __future__ import annotations

import math

import pytest

from tunelab.eval.stats import (
    BETTER,
    UNDECIDED,
    WORSE,
    describe,
    paired_comparison,
    percentile_interval,
    sign_test_p,
    verdict,
)


def binomial_two_sided(wins: int, losses: int) -> float:
    """By hand: P(X <= k) + P(X >= n - k) for X ~ Bin(n, 1/2), k = the smaller count."""
    n, k = wins + losses, min(wins, losses)
    low = sum(math.comb(n, i) for i in range(0, k + 1)) / 2**n
    high = sum(math.comb(n, i) for i in range(n - k, n + 1)) / 2**n
    return min(1.0, low + high)


def test_sign_test_matches_the_exact_binomial_tails():
    assert sign_test_p(23, 15) == pytest.approx(binomial_two_sided(23, 15), abs=1e-12)
    assert sign_test_p(23, 15) == pytest.approx(0.2559, abs=5e-5)  # the re-run of the quickstart
    assert sign_test_p(29, 12) == pytest.approx(binomial_two_sided(29, 12), abs=1e-12)
    assert sign_test_p(29, 12) == pytest.approx(0.0115, abs=5e-5)
    assert sign_test_p(12, 29) == sign_test_p(29, 12)  # two-sided: symmetric
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)  # all five the same way: 2 x (1/2)^5
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0


def test_ties_are_dropped_from_the_sign_test():
    base = [0.5] * 10 + [0.4] * 8 + [0.6] * 2
    tuned = [0.5] * 10 + [0.6] * 8 + [0.4] * 2  # 10 ties, 8 wins, 2 losses
    stats = paired_comparison(base, tuned)
    assert (stats["wins"], stats["ties"], stats["losses"]) == (8, 10, 2)
    assert stats["sign_test_p"] == pytest.approx(binomial_two_sided(8, 2))
    assert stats["win_rate_non_tied"] == pytest.approx(0.8)
    assert stats["mean_difference"] == pytest.approx((8 * 0.2 - 2 * 0.2) / 20)


def test_verdicts():
    assert verdict(29, 12) == BETTER and verdict(12, 29) == WORSE
    assert verdict(23, 15) == UNDECIDED and verdict(0, 0) == UNDECIDED
    assert verdict(5, 0) == UNDECIDED  # p = 0.0625: five prompts cannot show it
    assert verdict(6, 0) == BETTER  # p = 0.03125


def test_percentile_interval_rounds_ranks_outwards():
    values = list(range(101))  # 0..100: the 2.5th percentile sits at rank 2.5 -> 2, the 97.5th at 97.5 -> 98
    assert percentile_interval(values) == (2, 98)
    assert percentile_interval(list(range(41))) == (1, 39)  # ranks 1.0 and 39.0 exactly
    assert percentile_interval([]) is None


def test_bootstrap_intervals_agree_with_the_normal_approximation_and_are_reproducible():
    # 30 wins, 18 losses, no ties: win rate 0.625, binomial standard error sqrt(p(1-p)/48) = 0.0699.
    base, tuned = [0.0] * 48, [1.0] * 30 + [-1.0] * 18
    stats = paired_comparison(base, tuned)
    se = math.sqrt(0.625 * 0.375 / 48)
    low, high = stats["win_rate_interval"]
    assert low == pytest.approx(0.625 - 1.96 * se, abs=0.03) and high == pytest.approx(0.625 + 1.96 * se, abs=0.03)
    # The mean difference is 2p - 1 here, so its interval is the win rate's, stretched.
    d_low, d_high = stats["mean_difference_interval"]
    assert (d_low, d_high) == pytest.approx((2 * low - 1, 2 * high - 1))
    assert paired_comparison(base, tuned) == stats  # fixed seed
    assert stats["bootstrap"] == {"resamples": 2000, "seed": 0, "confidence": 0.95}
    assert paired_comparison(base, tuned, seed=1)["win_rate_interval"] != stats["win_rate_interval"]


def test_unanimous_and_empty_comparisons():
    stats = paired_comparison([0.2] * 8, [0.9] * 8)
    assert stats["win_rate_interval"] == [1.0, 1.0] and stats["verdict"] == BETTER
    ties = paired_comparison([0.5] * 4, [0.5] * 4)
    assert ties["win_rate_non_tied"] is None and ties["win_rate_interval"] is None
    assert ties["mean_difference_interval"] == [0.0, 0.0] and ties["verdict"] == UNDECIDED
    assert "n/a" in describe(ties) and "no detectable difference" in describe(ties)
    with pytest.raises(ValueError):
        paired_comparison([0.1], [0.1, 0.2])


def test_describe_names_counts_interval_p_and_verdict():
    text = describe(paired_comparison([0.0] * 41, [1.0] * 29 + [-1.0] * 12))
    assert text.startswith("29 wins / 0 ties / 12 losses; win rate of non-tied 71% [")
    assert "p = 0.0115: better" in text
