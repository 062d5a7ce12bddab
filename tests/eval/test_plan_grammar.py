"""The day-plan grammar in llama.cpp on the embedded GGUF: exactly N "Day n" sections, in order, then end-of-turn."""

from __future__ import annotations

import re

import pytest

from tests.helpers import embedded_gguf
from tunelab.errors import UserError
from tunelab.eval.plan_grammar import day_plan_grammar, token_budget


def test_grammar_needs_a_day_count_the_planner_allows():
    for bad in (0, 15):
        with pytest.raises(UserError, match="1 to 14 days"):
            day_plan_grammar(bad)


@pytest.mark.parametrize("days", [1, 3])
def test_sampled_plans_have_exactly_the_requested_days_and_end_at_end_of_turn(days):
    from llama_cpp import LlamaGrammar

    from tunelab.models.inference import load_backend

    llm = load_backend(embedded_gguf(), threads=1).llm
    grammar = LlamaGrammar.from_string(day_plan_grammar(days), verbose=False)
    prompt = f"Plan a {days}-day trip to Porto for someone who loves food and museums."
    for seed in (0, 1):
        result = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.8, seed=seed,
                                            max_tokens=token_budget(days), grammar=grammar)  # fmt: skip
        text = result["choices"][0]["message"]["content"]
        # Counted by hand, independently of the rubric: lines that start "Day <n>".
        assert [int(n) for n in re.findall(r"^Day (\d+)\b", text, re.M)] == list(range(1, days + 1)), text
        assert re.findall(r"\bDay (\d+):", text) == [str(n) for n in range(1, days + 1)], text
        assert result["choices"][0]["finish_reason"] == "stop", text  # the grammar completed, then end-of-turn
        for section in re.split(r"^Day \d+: .*\n", text, flags=re.M)[1:]:
            assert 2 <= len(re.findall(r"^- ", section, re.M)) <= 3, text


def test_the_domain_eval_decodes_under_the_grammar_only_when_asked_and_only_with_a_day_count():
    from tunelab.eval.domain import Decoding, gguf_generator
    from tunelab.eval.rubric import TravelPrompt

    two_days = TravelPrompt(prompt="Plan 2 days in Lisbon for someone who loves food.", city="Lisbon", days=2)
    constrained = gguf_generator(embedded_gguf(), Decoding(max_new_tokens=8, day_grammar=True), threads=1)
    answer = constrained(
        two_days, None
    )  # greedy; the grammar's own budget, not max_new_tokens=8, so the plan can finish
    assert re.findall(r"^Day (\d+):", answer.text, re.M) == ["1", "2"] and answer.finished, answer.text
    free = constrained(TravelPrompt(prompt=two_days.prompt), None)  # no day count: no grammar, max_new_tokens applies
    assert not free.finished and len(free.text.split()) <= 8
