"""The sweep report's plot axes: numeric x at its value (log for learning rates), one line per other setting,
keys that move together (alpha = 2 x rank) not split into series."""

import pytest

from tunelab.experiments.results import _base_marks, _series_by_other_keys, _tied, _x_axis, swept_keys


def _run(name, base_travel=0.5, **overrides):
    return {"name": name, "overrides": overrides, "travel_score_base": base_travel, "travel_score_tuned": 0.6}


GRID = [
    _run("a", **{"train.lr": 2e-4, "lora.r": 16, "lora.alpha": 32}),
    _run("b", **{"train.lr": 2e-4, "lora.r": 64, "lora.alpha": 128}),
    _run("c", **{"train.lr": 5e-6, "lora.r": 16, "lora.alpha": 32}),
    _run("d", **{"train.lr": 5e-6, "lora.r": 64, "lora.alpha": 128}),
]


def test_learning_rates_sit_at_their_value_on_a_log_axis():
    positions, ticks, log_x = _x_axis([r["overrides"]["train.lr"] for r in GRID])
    assert log_x and ticks == []
    assert positions == {repr(2e-4): 2e-4, repr(5e-6): 5e-6}


def test_narrow_numbers_are_linear_and_other_values_are_ticks_in_first_seen_order():
    assert _x_axis([16, 64, 16])[2] is False
    positions, ticks, log_x = _x_axis([True, False, True])
    assert positions == {"True": 0.0, "False": 1.0} and ticks == ["True", "False"] and not log_x


def test_alpha_that_follows_the_rank_is_not_a_series_but_the_learning_rate_is():
    assert _tied(GRID, "lora.r", "lora.alpha")
    assert not _tied(GRID, "lora.r", "train.lr")
    others = [k for k in swept_keys(GRID) if k != "lora.r" and not _tied(GRID, "lora.r", k)]
    series = _series_by_other_keys(GRID, others)
    assert {label: [r["name"] for r in runs] for label, runs in series.items()} == {
        "train.lr=0.0002": ["a", "b"],
        "train.lr=5e-06": ["c", "d"],
    }


def test_the_base_line_is_the_base_value_of_a_tuned_metric_only():
    positions = _x_axis([r["overrides"]["train.lr"] for r in GRID])[0]
    assert _base_marks(GRID, "travel_score_tuned", "train.lr", positions) == [(0.5, None)]  # one line for all runs
    assert _base_marks(GRID, "final_train_loss", "train.lr", positions) == []


def test_a_sweep_over_the_base_model_marks_each_runs_own_base():
    sizes = [_run("small", 0.825, **{"model.name": "small"}), _run("large", 0.788, **{"model.name": "large"})]
    positions = _x_axis([r["overrides"]["model.name"] for r in sizes])[0]
    assert _base_marks(sizes, "travel_score_tuned", "model.name", positions) == [(0.825, 0.0), (0.788, 1.0)]


def test_a_swept_source_list_is_shown_by_its_source_names():
    from tunelab.experiments.results import _fmt

    sources = [
        {"preset": "embedded:sharegpt", "name": "sharegpt-general", "max_records": 2000},
        {"preset": "embedded:chatterbot", "name": "chatterbot", "weight": 0.5},
    ]
    assert _fmt(sources) == "sharegpt-general + chatterbot"
    assert _fmt([1, 2]) == "[1, 2]"


def _judged(name, wins, losses, ties=0):
    """A sweep result whose travel comparison is `wins` prompts scoring +0.2 and `losses` scoring -0.2 over a base
    of 0.5, with its statistics from eval/stats.py."""
    from tunelab.eval.stats import paired_comparison

    n = wins + losses + ties
    stats = paired_comparison([0.5] * n, [0.7] * wins + [0.3] * losses + [0.5] * ties)
    return {
        "name": name, "overrides": {"lora.r": wins}, "curves": {"train": [(1, 2.0)], "val": []},
        "travel_score_base": 0.5, "travel_score_tuned": 0.5 + stats["mean_difference"],
        "travel_wins": wins, "travel_ties": ties, "travel_losses": losses,
        "travel_win_rate": stats["win_rate_non_tied"], "travel_win_rate_interval": stats["win_rate_interval"],
        "travel_score_difference_interval": stats["mean_difference_interval"],
        "travel_sign_test_p": stats["sign_test_p"], "travel_verdict": stats["verdict"],
    }  # fmt: skip


def test_tables_show_the_interval_p_value_and_verdict_and_plots_draw_them_as_error_bars(tmp_path):
    import csv

    from tunelab.experiments.results import _error_bar, with_derived, write_report

    runs = [_judged("small", 23, 15, 10), _judged("large", 29, 12, 7)]
    write_report(tmp_path, runs)
    table = (tmp_path / "results.md").read_text()
    low, high = runs[1]["travel_win_rate_interval"]
    assert f"| 29/7/12 | 0.71 [{low:.2f}, {high:.2f}] | 0.012: better |" in table
    assert "| 23/10/15 | 0.61 [" in table and "| 0.256: no detectable difference at this size |" in table
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert float(rows[1]["travel_win_rate_low"]) == low and rows[0]["travel_verdict"].startswith("no detectable")
    assert (tmp_path / "metrics_vs_lora_r.png").is_file()
    # Error bars: the win rate's own interval; the tuned score's from base + the score-difference interval.
    row = with_derived(runs[1])
    below, above = _error_bar(row, "travel_win_rate")
    assert (row["travel_win_rate"] - below, row["travel_win_rate"] + above) == pytest.approx((low, high))
    d_low, d_high = runs[1]["travel_score_difference_interval"]
    below, above = _error_bar(row, "travel_score_tuned")
    assert (row["travel_score_tuned"] - below, row["travel_score_tuned"] + above) == pytest.approx(
        (0.5 + d_low, 0.5 + d_high)
    )
    assert _error_bar(row, "general_val_loss_tuned") is None
