"""What the app accepts from a client: server-side limits, text cleaning, escaping and parameter bounds.

The HTTP API is as public as the page, so every input is cleaned (control characters dropped) and
length-checked here; UI limits alone prove nothing. Text from users and from the model is HTML-escaped before
it reaches a Markdown/Chatbot component, so `<script>` in a prompt is shown as text, never run.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from tunelab.models.inference import GenerationParams

PLANNER_MAX_NEW_TOKENS = 600  # the Travel Planner's default token budget (its slider starts here)
# The Travel Planner decodes under the day-plan grammar by default wherever the served model takes a grammar
# (llama.cpp): on the 48 shipped prompts it raised the rubric score of the embedded base and of the quickstart's
# tuned q4_k_m alike (docs/experiments.md, "The planner's default decoding").
PLANNER_DAY_FORMAT = True


@dataclass(frozen=True)
class Limits:
    """Server-side limits; the UI shows the same ones but never enforces them alone."""

    max_message_chars: int = 4_000
    max_system_prompt_chars: int = 2_000
    max_history_chars: int = 6_000  # older turns are dropped so the prompt fits the model's context
    max_new_tokens: int = 1_024
    max_city_chars: int = 80
    max_preferences_chars: int = 1_000
    min_days: int = 1
    max_days: int = 14


class InputError(ValueError):
    """A problem with what the user typed; shown as a friendly message, never a traceback."""


_INVISIBLE_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")  # bidi overrides can disguise text


def clean_text(text: str | None) -> str:
    """Drop control characters (except newline and tab) and bidi overrides; normalise newlines."""
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return _INVISIBLE_CONTROLS.sub("", text)


def escape_for_display(text: str) -> str:
    """Make text inert for Gradio's Markdown renderers: tags show as text, Markdown formatting still works."""
    return html.escape(text, quote=False)


def check_length(name: str, text: str, limit: int) -> str:
    if len(text) > limit:
        raise InputError(f"{name} is {len(text):,} characters long; the limit is {limit:,}. Please shorten it.")
    return text


def clamp_params(temperature: Any, top_p: Any, max_new_tokens: Any, limits: Limits, **extra: Any) -> GenerationParams:
    """Bounds enforced here, whatever the client sends."""
    try:
        temperature = min(max(float(temperature), 0.0), 2.0)
        top_p = min(max(float(top_p), 0.05), 1.0)
        max_new_tokens = min(max(int(max_new_tokens), 1), limits.max_new_tokens)
    except (TypeError, ValueError):
        raise InputError("The generation settings must be numbers.") from None
    return GenerationParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, **extra)


def fit_history(turns: list[dict], budget_chars: int) -> list[dict]:
    """The most recent successful turns whose text fits the budget (oldest dropped first)."""
    kept: list[dict] = []
    used = 0
    for turn in reversed([t for t in turns if not t.get("error")]):
        size = len(turn["user"]) + len(turn["assistant"])
        if used + size > budget_chars:
            break
        kept.append(turn)
        used += size
    return list(reversed(kept))
