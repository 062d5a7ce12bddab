"""serve/handlers.py: the app's handlers, called directly with a scripted backend (fast: no server, no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import GrammarBackend, ScriptedBackend
from tunelab.eval.plan_grammar import day_plan_grammar, token_budget
from tunelab.serve.feedback_store import FeedbackStore
from tunelab.serve.handlers import ChatApp, chat_display, planner_decoding, turn_for_message
from tunelab.serve.limits import Limits

REQUEST = SimpleNamespace(session_hash="abc123")


def planner_args(**overrides):
    args = dict(city="Lisbon", days=3, when="spring", budget="budget", pace="relaxed", interests=["food"],
                preferences="no early mornings")  # fmt: skip
    args.update(overrides)
    return args


@pytest.fixture
def app(tmp_path):
    return ChatApp(ScriptedBackend(), FeedbackStore(tmp_path / "fb.db"), Limits(max_message_chars=100))


def run(gen):
    """All yields of a streaming handler; the last one is what the user ends up with."""
    return list(gen)


def test_chat_display_escapes_both_sides_and_shows_errors():
    shown = chat_display(
        [{"user": "<b>hi</b>", "assistant": "<i>yo</i>"}, {"user": "x", "assistant": "", "error": "oops"}]
    )
    assert shown[0]["content"] == "&lt;b&gt;hi&lt;/b&gt;" and shown[1]["content"] == "&lt;i&gt;yo&lt;/i&gt;"
    assert shown[-1] == {"role": "assistant", "content": "⚠️ oops"}


# ----------------------------------------------------------------------------------- planner
def test_plan_streams_markdown_and_remembers_the_answer(app):
    outputs = run(app.plan(**planner_args(city="<b>Rome</b>"), temperature=0.2, max_new_tokens=5000, last_plan=None))
    plan, record, status = outputs[-1]
    assert len(outputs) > 3  # streamed piece by piece
    assert plan.startswith("# 3-day plan for &lt;b&gt;Rome&lt;/b&gt;")
    assert record["tab"] == "planner" and record["inputs"]["city"] == "<b>Rome</b>"
    assert record["params"]["max_new_tokens"] == Limits().max_new_tokens  # clamped
    assert record["response"].startswith("You said: Plan a 3-day trip")
    assert status.startswith("Done")


def test_plan_with_zero_days_shows_message_and_never_calls_the_model(app):
    *_, (plan, record, status) = run(
        app.plan(**planner_args(days=0), temperature=0.7, max_new_tokens=50, last_plan=None)
    )
    assert "between 1 and 14 days" in status and record is None
    assert app.backend.calls == []


def test_plan_with_the_day_format_sends_the_grammar_and_its_budget_to_a_backend_that_takes_one(tmp_path):
    backend = GrammarBackend()
    app = ChatApp(backend, FeedbackStore(tmp_path / "fb.db"))
    *_, (plan, record, status) = run(app.plan(**planner_args(days=2), temperature=0.0, max_new_tokens=16,
                                              last_plan=None, day_format=True))  # fmt: skip
    assert backend.grammars == [day_plan_grammar(2)] and status == "Done. Rate the plan below."
    assert backend.calls[0][1].max_new_tokens == token_budget(2)  # the format's budget, not the slider's 16
    assert record["params"] == {**record["params"], "max_new_tokens": token_budget(2), "day_grammar": True}
    *_, (plan, record, status) = run(app.plan(**planner_args(days=14), temperature=0.0, max_new_tokens=16,
                                              last_plan=None, day_format=True))  # fmt: skip
    assert backend.calls[-1][1].max_new_tokens == Limits().max_new_tokens  # never past the server's limit
    *_, (plan, record, status) = run(
        app.plan(**planner_args(days=2), temperature=0.0, max_new_tokens=16, last_plan=None)
    )
    assert (
        backend.grammars[-1] is None
        and backend.calls[-1][1].max_new_tokens == 16
        and "day_grammar" not in record["params"]
    )


def test_plan_with_the_day_format_on_a_backend_without_grammars_says_so_and_plans_anyway(app):
    outputs = run(app.plan(**planner_args(), temperature=0.0, max_new_tokens=16, last_plan=None, day_format=True))
    notice = "ℹ️ Planned without the day-by-day format: the scripted backend cannot take a grammar"
    assert all(notice in status and "\n" not in status for *_, status in outputs)
    *_, (plan, record, status) = outputs
    assert status.startswith("Done. Rate the plan below. ") and record["response"].startswith("You said: Plan a 3-day")
    assert app.backend.calls[0][1].max_new_tokens == 16 and "day_grammar" not in record["params"]


@pytest.mark.parametrize("backend_class", ["TransformersBackend", "OpenAIBackend"])
def test_transformers_and_remote_backends_do_not_take_a_grammar(backend_class):
    import tunelab.models.inference as inference
    import tunelab.models.openai_backend as openai_backend

    cls = getattr(inference, backend_class, None) or getattr(openai_backend, backend_class)
    backend = cls.__new__(cls)  # the class's capabilities, without loading a model or reaching a server
    params = inference.GenerationParams(max_new_tokens=16)
    grammar, used, notice = planner_decoding(True, 2, params, Limits(), [backend])
    assert grammar is None and used == params and f"the {cls.kind} backend cannot take a grammar" in notice
    assert inference.takes_grammar(inference.LlamaCppBackend.__new__(inference.LlamaCppBackend))


# -------------------------------------------------------------------------------------- chat
def test_chat_streams_and_records_what_the_model_saw(app):
    outputs = run(app.chat("Hello there", "Be nice", 0.5, 0.8, 32, [], None))
    chatbot, turns, record, _, status = outputs[-1]
    assert chatbot[-1] == {"role": "assistant", "content": "You said: Hello there"}
    assert [(t["user"], t["assistant"]) for t in turns] == [("Hello there", "You said: Hello there")]
    assert turns[0]["record"] == record
    assert record["messages"] == [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hello there"}]
    assert record["params"]["temperature"] == 0.5 and record["model_id"] == "scripted-model"
    assert status.startswith("Done")


def test_second_turn_sends_the_history(app):
    *_, (_, turns, _, _, _) = run(app.chat("one", "", 0.5, 0.8, 32, [], None))
    *_, (_, turns, record, _, _) = run(app.chat("two", "", 0.5, 0.8, 32, turns, None))
    assert [m["content"] for m in record["messages"]] == ["one", "You said: one", "two"]


def test_too_long_message_is_refused_before_generation(app):
    *_, (chatbot, turns, record, box, status) = run(app.chat("x" * 101, "", 0.5, 0.8, 32, [], None))
    assert "limit is 100" in status and turns == [] and record is None
    assert app.backend.calls == []


def test_generation_error_is_shown_not_raised(tmp_path):
    backend = ScriptedBackend(
        reply="partial answer here", fail_with=ValueError("Requested tokens exceed context window")
    )
    app = ChatApp(backend, FeedbackStore(tmp_path / "fb.db"))
    *_, (chatbot, turns, record, _, status) = run(app.chat("hi", "", 0.5, 0.8, 32, [], None))
    assert "too long for this model" in status
    assert chatbot[-1]["content"].startswith("partial ") and "⚠️" in chatbot[-1]["content"]
    assert record is None  # a failed answer cannot be rated as if it were complete
    # the failed turn is not sent to the model again
    backend.fail_with = None
    *_, (_, _, record, _, _) = run(app.chat("again", "", 0.5, 0.8, 32, turns, None))
    assert [m["content"] for m in record["messages"]] == ["again"]


# ---------------------------------------------------------------------------------- feedback
def test_feedback_is_stored_for_the_latest_answer(app):
    *_, (_, _, answer, _, _) = run(app.chat("Hello", "", 0.5, 0.8, 32, [], None))
    status, *cleared = app.submit_feedback(
        "down", ["too short", "incorrect"], " meh\x00 ", "Hi!", answer, request=REQUEST
    )
    assert status.startswith("✅") and cleared == [None, [], "", ""]
    [row] = app.store.rows()
    assert row["rating"] == -1 and row["reasons"] == ["incorrect", "too short"]  # canonical order
    assert row["comment"] == "meh" and row["better_answer"] == "Hi!"
    assert row["response"] == "You said: Hello" and row["tab"] == "chat"
    assert len(row["session_id"]) == 16 and "abc123" not in row["session_id"]


@pytest.mark.parametrize(
    "rating, answer, comment, message",
    [
        ("up", None, "", "no answer to rate"),
        ("meh", {"response": "x"}, "", "Pick 👍 or 👎"),
        ("up", {"response": "x"}, "c" * 2001, "limit is 2,000"),
    ],
)
def test_feedback_problems_are_friendly_and_store_nothing(app, rating, answer, comment, message):
    status, *_ = app.submit_feedback(rating, [], comment, "", answer, request=REQUEST)
    assert message in status
    assert app.store.count() == 0


def test_thumbs_on_an_older_message_selects_that_answer(app):
    *_, (_, turns, _, _, _) = run(app.chat("first", "", 0.5, 0.8, 32, [], None))
    *_, (_, turns, latest, _, _) = run(app.chat("second", "", 0.5, 0.8, 32, turns, None))
    record, rating, note = app.select_answer(turns, SimpleNamespace(index=1, liked=False))
    assert record["response"] == "You said: first" and rating == "down" and "answer 1" in note
    record, rating, _ = app.select_answer(turns, SimpleNamespace(index=3, liked=True))
    assert record is latest and rating == "up"
    first, _, _ = app.select_answer(turns, SimpleNamespace(index=1, liked=False))
    status, *_ = app.submit_feedback("down", ["too short"], "", "", first, request=REQUEST)
    assert status.startswith("✅") and app.store.rows()[0]["response"] == "You said: first"


def test_turn_for_message_skips_user_messages_and_counts_error_turns():
    turns = [
        {"user": "a", "assistant": "b"},
        {"user": "c", "assistant": "", "error": "x"},
        {"user": "d", "assistant": "e"},
    ]
    assert turn_for_message(turns, 1) is turns[0]
    assert turn_for_message(turns, 3) is turns[1]
    assert turn_for_message(turns, 5) is turns[2]
    assert turn_for_message(turns, 0) is None and turn_for_message(turns, 9) is None


def test_without_shared_feedback_data_the_overview_hides_items_and_download_is_refused(tmp_path):
    import gradio as gr

    app = ChatApp(ScriptedBackend(), FeedbackStore(tmp_path / "fb.db"), share_feedback_data=False)
    *_, (_, _, answer, _, _) = run(app.chat("private question", "", 0.5, 0.8, 32, [], None))
    app.submit_feedback("up", [], "private comment", "", answer, request=REQUEST)
    headline, by_rating, _, _, recent = app.overview()
    assert "**1**" in headline and by_rating == [["up", 1]] and recent == []
    with pytest.raises(gr.Error):
        app.download("jsonl")


def test_download_files_are_complete_and_never_shared_between_calls(app):
    import csv
    import json as json_module

    *_, (_, _, answer, _, _) = run(app.chat("hi", "", 0.5, 0.8, 32, [], None))
    app.submit_feedback("up", ["other"], 'a, "quoted" comment', "", answer, request=REQUEST)
    jsonl, csv_path = app.download("jsonl"), app.download("csv")
    assert jsonl != csv_path and jsonl.endswith(".jsonl") and csv_path.endswith(".csv")
    [row] = [json_module.loads(line) for line in open(jsonl, encoding="utf-8")]
    assert row["comment"] == 'a, "quoted" comment' and row["reasons"] == ["other"]
    [csv_row] = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert csv_row["comment"] == 'a, "quoted" comment'
    assert app.download("jsonl") != jsonl


def test_an_app_leaves_no_download_folder_behind(tmp_path):
    """Building an app creates no temp folder; the one a download needs goes away with the app."""
    import gc
    from pathlib import Path

    app = ChatApp(ScriptedBackend(), FeedbackStore(tmp_path / "fb.db"))
    assert app._download_dir is None  # nothing made until someone downloads
    *_, (_, _, answer, _, _) = run(app.chat("hi", "", 0.5, 0.8, 32, [], None))
    app.submit_feedback("up", [], "", "", answer, request=REQUEST)
    folder = Path(app.download("jsonl")).parent
    assert folder.is_dir() and folder.name.startswith("tunelab-feedback-")
    del app
    gc.collect()
    assert not folder.exists()
