"""serve/limits.py: what the app accepts from a client (cleaning, escaping, bounds, history budget)."""

from __future__ import annotations

import pytest

from tunelab.serve.handlers import build_chat_messages
from tunelab.serve.limits import InputError, Limits, clamp_params, clean_text, escape_for_display, fit_history


def test_clean_text_drops_control_characters_but_keeps_newlines_tabs_and_unicode():
    assert clean_text("a\x00b\x07c\r\nd\te\u202eF\x7f") == "abc\nd\teF"
    assert clean_text("Zürich 🚲 東京") == "Zürich 🚲 東京"
    assert clean_text(None) == ""


def test_escape_for_display_neutralises_tags_but_keeps_markdown():
    shown = escape_for_display('## Day 1\n- **Walk** <script>alert("x")</script> & <img src=x onerror=1>')
    assert "<script>" not in shown and "<img" not in shown
    assert "&lt;script&gt;" in shown and "&amp;" in shown
    assert shown.startswith("## Day 1\n- **Walk**")


def test_clamp_params_enforces_server_side_bounds():
    params = clamp_params(9, 0, 10**9, Limits(max_new_tokens=300))
    assert (params.temperature, params.top_p, params.max_new_tokens) == (2.0, 0.05, 300)
    with pytest.raises(InputError):
        clamp_params("hot", 0.9, 10, Limits())


def test_history_keeps_the_newest_turns_that_fit_and_skips_failed_ones():
    turns = [
        {"user": "a" * 50, "assistant": "b" * 50},
        {"user": "old error", "assistant": "", "error": "boom"},
        {"user": "c" * 10, "assistant": "d" * 10},
    ]
    assert fit_history(turns, 30) == [turns[2]]
    assert fit_history(turns, 1000) == [turns[0], turns[2]]
    messages = build_chat_messages("sys", turns, "now?", Limits())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert build_chat_messages("  ", [], "hi", Limits()) == [{"role": "user", "content": "hi"}]
