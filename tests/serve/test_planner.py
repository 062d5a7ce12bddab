"""serve/planner.py: Travel Planner inputs are validated with friendly messages; the prompt comes from its files."""

from __future__ import annotations

import pytest

from tunelab.serve.limits import InputError, Limits
from tunelab.serve.planner import PlannerPrompt, validate_planner_inputs


def planner_args(**overrides):
    args = dict(city="Lisbon", days=3, when="spring", budget="budget", pace="relaxed", interests=["food"],
                preferences="no early mornings")  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"city": "   "}, "Please enter a city"),
        ({"city": "\x00\x01"}, "Please enter a city"),
        ({"days": 0}, "between 1 and 14 days"),
        ({"days": 60}, "between 1 and 14 days"),
        ({"days": 2.5}, "between 1 and 14 days"),
        ({"days": "many"}, "whole number"),
        ({"city": "X" * 81}, "limit is 80"),
        ({"when": "someday"}, "Travel time"),
        ({"budget": "free"}, "Budget"),
        ({"interests": ["<script>"]}, "Unknown interests"),
        ({"preferences": "p" * 1001}, "limit is 1,000"),
    ],
)
def test_planner_rejects_bad_inputs_with_a_friendly_message(overrides, message):
    with pytest.raises(InputError, match=message):
        validate_planner_inputs(**planner_args(**overrides), limits=Limits())


def test_planner_prompt_comes_from_the_template_file():
    inputs = validate_planner_inputs(**planner_args(city="  Porto\x00 ", days=2.0), limits=Limits())
    assert inputs.city == "Porto" and inputs.days == 2
    system, user = PlannerPrompt().messages(inputs)
    assert system["role"] == "system" and "travel planner" in system["content"]
    assert user["content"].startswith("Plan a 2-day trip to Porto in spring.")
    assert "Interests: food." in user["content"] and "no early mornings" in user["content"]
    assert "## Day N" in user["content"]


def test_planner_template_can_be_replaced(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("Trip: {{ city }} for {{ days }} days")
    inputs = validate_planner_inputs(**planner_args(), limits=Limits())
    assert PlannerPrompt(template).messages(inputs)[1]["content"] == "Trip: Lisbon for 3 days"
