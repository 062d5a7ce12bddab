"""How sure a base-vs-tuned comparison is: a paired sign test, bootstrap intervals and a plain verdict.

    stats = paired_comparison(base_scores, tuned_scores)  # one score per prompt and side, same prompt order
    stats["sign_test_p"], stats["win_rate_interval"], stats["verdict"]

Per prompt the tuned side wins when its score is higher, loses when lower, ties when equal (within 1e-9).
- Sign test: ties are dropped; under "neither side is better" each of the n = wins + losses decided prompts is a
  fair coin, so the two-sided p-value is the exact binomial tail 2 * P(X <= min(wins, losses)), X ~ Bin(n, 1/2),
  capped at 1.
- Bootstrap: the prompts are resampled with replacement (pairs stay together) BOOTSTRAP_RESAMPLES times from a
  fixed seed; the 95 % interval is the 2.5th and 97.5th percentile of the resampled statistic (ranks rounded outwards).
  Two statistics: the win rate among non-tied prompts (a resample with no decided prompt is skipped) and the mean
  per-prompt score difference, tuned minus base.
- Verdict: "better" or "worse" when the sign test rejects "no difference" at ALPHA (in the direction of the
  majority), otherwise "no detectable difference at this size" — fewer prompts need a larger margin.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

ALPHA = 0.05
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
TIE_TOLERANCE = 1e-9

BETTER, WORSE, UNDECIDED = "better", "worse", "no detectable difference at this size"


def outcome(base: float, tuned: float) -> str:
    """ "win" when the tuned score is higher, "loss" when lower, "tie" when they are equal within TIE_TOLERANCE."""
    if abs(tuned - base) < TIE_TOLERANCE:
        return "tie"
    return "win" if tuned > base else "loss"


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of `wins` against `losses` (ties already dropped); 1.0 with none decided."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def percentile_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The (lower, upper) percentiles that hold `confidence` of `values` between them, ranks rounded outwards."""
    if not values:
        return None
    ordered = sorted(values)
    tail = (1 - confidence) / 2
    last = len(ordered) - 1
    # Ranks rounded outwards (the interval never narrows by rounding); round(, 9) keeps 0.025 * 100 at 2.5.
    return ordered[math.floor(round(tail * last, 9))], ordered[math.ceil(round((1 - tail) * last, 9))]


def _win_rate(diffs: Sequence[float]) -> float | None:
    wins = sum(d >= TIE_TOLERANCE for d in diffs)
    losses = sum(d <= -TIE_TOLERANCE for d in diffs)
    return wins / (wins + losses) if wins + losses else None


def bootstrap_intervals(
    diffs: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, tuple[float, float] | None]:
    """95 % bootstrap intervals of the win rate among non-tied prompts and of the mean of the per-prompt
    differences (tuned - base), from `resamples` resamples of the prompts drawn with a fixed seed."""
    if not diffs:
        return {"win_rate": None, "mean_difference": None}
    rng = random.Random(seed)
    n = len(diffs)
    rates, means = [], []
    for _ in range(resamples):
        sample = [diffs[rng.randrange(n)] for _ in range(n)]
        means.append(sum(sample) / n)
        rate = _win_rate(sample)
        if rate is not None:
            rates.append(rate)
    return {"win_rate": percentile_interval(rates), "mean_difference": percentile_interval(means)}


def verdict(wins: int, losses: int, alpha: float = ALPHA) -> str:
    if sign_test_p(wins, losses) >= alpha or wins == losses:
        return UNDECIDED
    return BETTER if wins > losses else WORSE


def paired_comparison(
    base_scores: Sequence[float],
    tuned_scores: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """Counts, win rate, sign test, bootstrap intervals and verdict for per-prompt scores of two models."""
    if len(base_scores) != len(tuned_scores):
        raise ValueError(f"{len(base_scores)} base scores for {len(tuned_scores)} tuned scores")
    outcomes = [outcome(b, t) for b, t in zip(base_scores, tuned_scores)]
    wins, ties, losses = (outcomes.count(o) for o in ("win", "tie", "loss"))
    diffs = [t - b for b, t in zip(base_scores, tuned_scores)]
    intervals = bootstrap_intervals(diffs, resamples, seed)
    return {
        "prompts": len(diffs),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate_non_tied": wins / (wins + losses) if wins + losses else None,
        "win_rate_interval": _listed(intervals["win_rate"]),
        "mean_difference": sum(diffs) / len(diffs) if diffs else None,
        "mean_difference_interval": _listed(intervals["mean_difference"]),
        "sign_test_p": sign_test_p(wins, losses),
        "verdict": verdict(wins, losses),
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE},
    }


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else list(interval)


def describe(stats: dict) -> str:
    """One line: counts, win rate with its interval, mean difference with its interval, p-value and verdict."""
    rate, rate_ci = stats["win_rate_non_tied"], stats["win_rate_interval"]
    diff, diff_ci = stats["mean_difference"], stats["mean_difference_interval"]
    rate_text = "n/a" if rate is None else f"{rate:.0%}" + (f" [{rate_ci[0]:.0%}, {rate_ci[1]:.0%}]" if rate_ci else "")
    diff_text = (
        "n/a" if diff is None else f"{diff:+.3f}" + (f" [{diff_ci[0]:+.3f}, {diff_ci[1]:+.3f}]" if diff_ci else "")
    )
    return (
        f"{stats['wins']} wins / {stats['ties']} ties / {stats['losses']} losses; win rate of non-tied {rate_text}, "
        f"mean score difference {diff_text} (95 % bootstrap intervals); sign test p = {stats['sign_test_p']:.3g}: "
        f"{stats['verdict']}"
    )
