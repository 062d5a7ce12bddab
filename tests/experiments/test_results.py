"""The sweep report's plot axes: numeric x at its value (log for learning rates), one line per other setting,
keys that move together (alpha = 2 x rank) not split into series."""

from tunelab.experiments.results import _base_value, _series_by_other_keys, _tied, _x_axis, swept_keys


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
    assert _base_value(GRID, "travel_score_tuned") == 0.5
    assert _base_value(GRID, "final_train_loss") is None


def test_a_swept_source_list_is_shown_by_its_source_names():
    from tunelab.experiments.results import _fmt

    sources = [
        {"preset": "embedded:sharegpt", "name": "sharegpt-general", "max_records": 2000},
        {"preset": "embedded:chatterbot", "name": "chatterbot", "weight": 0.5},
    ]
    assert _fmt(sources) == "sharegpt-general + chatterbot"
    assert _fmt([1, 2]) == "[1, 2]"
