"""The Travel Planner's "Follow the day-by-day format (grammar)" box (serve/handlers.planner_decoding) on real models:
llama.cpp (the embedded GGUF) decodes under eval/plan_grammar.day_plan_grammar and writes exactly the requested
days; the transformers backend cannot take a grammar, so the app says so in one line and plans without it. Greedy."""

from __future__ import annotations

import re

import pytest

from tests.helpers import embedded_gguf, save_tiny_llama_with_embedded_tokenizer
from tunelab.eval.plan_grammar import token_budget
from tunelab.serve.feedback_store import FeedbackStore
from tunelab.serve.handlers import ChatApp

pytestmark = pytest.mark.timeout(300)

TRIP = dict(city="Porto", when="any time", budget="mid-range", pace="balanced", interests=["food"], preferences="")
NOTICE = "Planned without the day-by-day format: the transformers backend cannot take a grammar"


@pytest.fixture(scope="module")
def llama_backend():
    from tunelab.models.inference import load_backend

    return load_backend(embedded_gguf(), threads=1)


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    yield store
    store.close()


def plan(app: ChatApp, days: int, day_format: bool, max_new_tokens: int = 16):
    """Every PlanUpdate of one greedy planner request."""
    return list(app.plan(**TRIP, days=days, temperature=0.0, max_new_tokens=max_new_tokens, last_plan=None,
                         day_format=day_format))  # fmt: skip


def test_llama_cpp_plan_with_the_box_ticked_has_exactly_the_requested_days(llama_backend, store):
    app = ChatApp(llama_backend, store)
    updates = plan(app, days=3, day_format=True)  # the slider's 16 tokens would cut it; the format's budget applies
    shown, record, status = updates[-1]
    text = record["response"]
    assert status == "Done. Rate the plan below.", status  # no notice: llama.cpp took the grammar
    assert shown.startswith("# 3-day plan for Porto\n\n")
    # Counted by hand, independently of the grammar: every line that starts "Day <n>", and every "Day <n>:".
    assert re.findall(r"^Day (\d+)\b", text, re.M) == ["1", "2", "3"], text
    assert re.findall(r"\bDay (\d+):", text) == ["1", "2", "3"], text
    for section in re.split(r"^Day \d+: .*\n", text, flags=re.M)[1:]:
        assert 2 <= len(re.findall(r"^- ", section, re.M)) <= 3, text
    assert record["params"]["max_new_tokens"] == token_budget(3) and record["params"]["day_grammar"] is True
    assert app.submit_feedback("up", [], "", "", record).status.startswith("✅")
    [row] = store.rows()
    assert row["params"]["day_grammar"] is True  # the stored plan says it was decoded under the grammar


def test_llama_cpp_plan_without_the_box_is_decoded_as_before(llama_backend, store):
    *_, (_, record, status) = plan(ChatApp(llama_backend, store), days=3, day_format=False)
    assert status == "Done. Rate the plan below."
    assert record["params"]["max_new_tokens"] == 16 and "day_grammar" not in record["params"]
    assert len(re.findall(r"^Day \d+:", record["response"], re.M)) < 3  # 16 tokens: no room for three days


def test_transformers_backend_says_in_one_line_that_it_plans_without_the_grammar(tmp_path, store):
    from tunelab.models.inference import TransformersBackend

    backend = TransformersBackend(save_tiny_llama_with_embedded_tokenizer(tmp_path / "tiny"), threads=1)
    updates = plan(ChatApp(backend, store), days=2, day_format=True, max_new_tokens=8)
    statuses = [update.status for update in updates]
    assert all(NOTICE in status for status in statuses), statuses  # from the first "Planning…" on
    assert all("\n" not in status for status in statuses)
    *_, (_, record, status) = updates
    assert status.startswith("Done. Rate the plan below. ℹ️ " + NOTICE), status  # generated, without the grammar
    assert record["params"]["max_new_tokens"] == 8 and "day_grammar" not in record["params"]  # the slider's budget
