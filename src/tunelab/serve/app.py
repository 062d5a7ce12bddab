"""The Gradio app: Chat, Travel Planner, feedback on every answer, and a feedback overview.

    backend = load_backend("model.gguf", threads=2)
    demo = build_app(backend, "feedback.db")
    url = launch(demo, host="127.0.0.1", port=7860, auth=None)

Design notes
- One backend (one model load) is shared by all sessions. llama.cpp is not thread-safe, so every generating
  event shares one Gradio concurrency group of size 1 (`MODEL_QUEUE`); other users wait in Gradio's queue.
  A remote backend (`--backend-url`) sets its own size: the server batches concurrent requests.
  Feedback and overview events run in parallel with generation.
- Every input is cleaned (control characters dropped) and length-checked on the server: the HTTP API is as
  public as the page, so UI limits alone prove nothing.
- Text from users and from the model is HTML-escaped before it reaches a Markdown/Chatbot component, so
  `<script>` in a prompt is shown as text, never rendered or executed.
- Generation errors (context overflow, backend failures) become a visible message; the server keeps running.
- What was generated (prompt, full answer, parameters) is kept in server-side session state, so feedback
  always describes the answer the model really gave, not what a client claims it gave.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import tempfile
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

# No usage analytics from a server that handles people's prompts (must be set before gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from tunelab import __version__
from tunelab.errors import UserError
from tunelab.serve.backends import ChatBackend, GenerationParams
from tunelab.serve.feedback import (
    MAX_BETTER_ANSWER_CHARS,
    MAX_COMMENT_CHARS,
    REASONS,
    FeedbackRecord,
    FeedbackStore,
    rows_to_csv,
)

log = logging.getLogger(__name__)

APP_VERSION = f"tunelab {__version__}"
PROMPTS_DIR = Path(__file__).parent / "prompts"
MODEL_QUEUE = "model"  # concurrency_id shared by every event that runs the model

INTERESTS = ("food", "museums", "nature", "nightlife", "family", "history", "art", "shopping", "architecture", "outdoor sports")
BUDGETS = ("budget", "mid-range", "luxury")
PACES = ("relaxed", "balanced", "packed")
WHEN_CHOICES = (
    "any time", "spring", "summer", "autumn", "winter",
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
RATINGS = (("👍 Good", "up"), ("👎 Bad", "down"))

DEFAULT_SYSTEM_PROMPT = "You are a helpful, concise assistant."


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


# ------------------------------------------------------------------------------ text hygiene
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


def session_id_for(request: gr.Request | None) -> str:
    """An anonymous id per browser session (a hash, so the DB cannot be joined with Gradio's own ids)."""
    raw = getattr(request, "session_hash", None) or "no-session"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def clamp_params(temperature: Any, top_p: Any, max_new_tokens: Any, limits: Limits, **extra: Any) -> GenerationParams:
    """Bounds enforced here, whatever the client sends."""
    try:
        temperature = min(max(float(temperature), 0.0), 2.0)
        top_p = min(max(float(top_p), 0.05), 1.0)
        max_new_tokens = min(max(int(max_new_tokens), 1), limits.max_new_tokens)
    except (TypeError, ValueError):
        raise InputError("The generation settings must be numbers.") from None
    return GenerationParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, **extra)


# ------------------------------------------------------------------------------ chat logic
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


def build_chat_messages(system_prompt: str, turns: list[dict], message: str, limits: Limits) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    budget = max(0, limits.max_history_chars - len(message) - len(system_prompt))
    for turn in fit_history(turns, budget):
        messages.append({"role": "user", "content": turn["user"]})
        messages.append({"role": "assistant", "content": turn["assistant"]})
    messages.append({"role": "user", "content": message})
    return messages


def chat_display(turns: list[dict]) -> list[dict[str, str]]:
    """Chatbot messages, escaped. Failed turns show the error in place of an answer."""
    shown: list[dict[str, str]] = []
    for turn in turns:
        shown.append({"role": "user", "content": escape_for_display(turn["user"])})
        answer = turn["assistant"]
        if turn.get("error"):
            answer = (answer + "\n\n" if answer else "") + f"⚠️ {turn['error']}"
        if answer:
            shown.append({"role": "assistant", "content": escape_for_display(answer)})
    return shown


def turn_for_message(turns: list[dict], message_index: Any) -> dict | None:
    """The turn whose assistant message sits at `message_index` in `chat_display(turns)`."""
    if isinstance(message_index, (list, tuple)):
        message_index = message_index[0]
    position = 0
    for turn in turns:
        position += 1  # the user message
        if turn["assistant"] or turn.get("error"):
            if position == message_index:
                return turn
            position += 1
    return None


def friendly_generation_error(exc: Exception) -> str:
    text = str(exc)
    if "context window" in text or "exceed context" in text:
        return "The conversation is too long for this model. Press Clear to start a new one."
    return f"Generation failed ({type(exc).__name__}). Please try again or start a new conversation."


# --------------------------------------------------------------------------- planner logic
@dataclass
class PlannerInputs:
    city: str
    days: int
    when: str
    budget: str
    pace: str
    interests: list[str]
    preferences: str


def validate_planner_inputs(
    city: Any, days: Any, when: Any, budget: Any, pace: Any, interests: Any, preferences: Any, limits: Limits
) -> PlannerInputs:
    city = " ".join(clean_text(city).split())
    if not city:
        raise InputError("Please enter a city to plan a trip to.")
    check_length("The city name", city, limits.max_city_chars)
    try:
        days_number = float(days)
    except (TypeError, ValueError):
        raise InputError(f"The number of days must be a whole number from {limits.min_days} to {limits.max_days}.") from None
    if not days_number.is_integer() or not limits.min_days <= days_number <= limits.max_days:
        raise InputError(
            f"Please choose between {limits.min_days} and {limits.max_days} days (got {days_number:g}). "
            "For longer journeys, plan one city at a time."
        )
    when = clean_text(when).strip() or "any time"
    if when not in WHEN_CHOICES:
        raise InputError(f"Travel time must be one of: {', '.join(WHEN_CHOICES)}.")
    if budget not in BUDGETS:
        raise InputError(f"Budget must be one of: {', '.join(BUDGETS)}.")
    if pace not in PACES:
        raise InputError(f"Pace must be one of: {', '.join(PACES)}.")
    interests = list(interests or [])
    unknown = [i for i in interests if i not in INTERESTS]
    if unknown:
        raise InputError(f"Unknown interests: {', '.join(map(str, unknown))}.")
    preferences = check_length("Your preferences", clean_text(preferences).strip(), limits.max_preferences_chars)
    return PlannerInputs(city, int(days_number), when, budget, pace, interests, preferences)


class PlannerPrompt:
    """The Travel Planner's prompt: a Jinja template file (user message) + a text file (system message)."""

    def __init__(self, template_path: Path | None = None, system_path: Path | None = None):
        template_path = template_path or PROMPTS_DIR / "travel_planner.jinja"
        system_path = system_path or PROMPTS_DIR / "travel_planner_system.txt"
        env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self.template = env.from_string(template_path.read_text(encoding="utf-8"))
        self.system = system_path.read_text(encoding="utf-8").strip()

    def messages(self, inputs: PlannerInputs) -> list[dict[str, str]]:
        when = "" if inputs.when == "any time" else inputs.when
        user = self.template.render(**{**asdict(inputs), "when": when}).strip()
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------- the app
class ChatApp:
    """Event handlers; one instance per server, shared by all sessions (per-session data lives in gr.State)."""

    def __init__(
        self,
        backend: ChatBackend,
        store: FeedbackStore,
        limits: Limits = Limits(),
        planner_prompt: PlannerPrompt | None = None,
        share_feedback_data: bool = True,
    ):
        self.backend = backend
        self.store = store
        self.limits = limits
        self.planner_prompt = planner_prompt or PlannerPrompt()
        self.share_feedback_data = share_feedback_data
        self._download_dir = Path(tempfile.mkdtemp(prefix="tunelab-feedback-"))

    def _stream(self, messages: list[dict[str, str]], params: GenerationParams) -> Iterator[str]:
        """Accumulated answer text; the backend's generator is closed even when the user presses Stop."""
        pieces = self.backend.stream_chat(messages, params)
        answer = ""
        try:
            for piece in pieces:
                answer += piece
                yield answer
        finally:
            close = getattr(pieces, "close", None)
            if close:
                close()

    def _answer_record(self, tab: str, messages, response: str, params: GenerationParams, inputs: dict) -> dict:
        return {
            "tab": tab,
            "messages": messages,
            "response": response,
            "params": asdict(params),
            "inputs": inputs,
            "model_id": self.backend.model_id,
        }

    # ------------------------------------------------------------------------------- chat tab
    def chat(self, message, system_prompt, temperature, top_p, max_new_tokens, turns, last_answer):
        """Stream one reply. Outputs: chatbot, turns state, last-answer state, message box, status."""
        turns = list(turns or [])
        try:
            message = check_length("Your message", clean_text(message).strip(), self.limits.max_message_chars)
            if not message:
                raise InputError("Please type a message first.")
            system_prompt = check_length(
                "The system prompt", clean_text(system_prompt), self.limits.max_system_prompt_chars
            )
            params = clamp_params(temperature, top_p, max_new_tokens, self.limits)
        except InputError as exc:
            yield chat_display(turns), turns, last_answer, gr.skip(), f"⚠️ {exc}"
            return
        messages = build_chat_messages(system_prompt, turns, message, self.limits)
        turn = {"user": message, "assistant": ""}
        turns.append(turn)
        inputs = {"message": message, "system_prompt": system_prompt}
        record = self._answer_record("chat", messages, "", params, inputs)
        yield chat_display(turns), turns, last_answer, "", "Generating…"
        try:
            for answer in self._stream(messages, params):
                turn["assistant"] = answer
                record = {**record, "response": answer}
                turn["record"] = record  # kept per turn: the 👍/👎 on an older message can select it later
                yield chat_display(turns), turns, record, gr.skip(), "Generating…"
        except Exception as exc:  # never let a model failure take the session (or server) down
            log.exception("chat generation failed")
            turn.pop("record", None)
            turn["error"] = friendly_generation_error(exc)
            yield chat_display(turns), turns, last_answer, gr.skip(), f"⚠️ {turn['error']}"
            return
        if not turn["assistant"]:
            turn["error"] = "The model returned an empty answer. Try again or rephrase."
            yield chat_display(turns), turns, last_answer, gr.skip(), f"⚠️ {turn['error']}"
            return
        yield chat_display(turns), turns, record, gr.skip(), "Done. Rate the answer below."

    def select_answer(self, turns, event: gr.LikeData):
        """The 👍/👎 under any chat answer: make that answer the one the feedback form rates.
        Outputs: last-answer state, rating, feedback status."""
        turn = turn_for_message(turns or [], event.index)
        if turn is None or not turn.get("record"):
            return gr.skip(), gr.skip(), "⚠️ That message cannot be rated."
        number = (turns or []).index(turn) + 1
        rating = "up" if event.liked is True else "down" if event.liked is False else None
        note = f"Rating answer {number}: add reasons or a better answer if you like, then press **Send feedback**."
        return turn["record"], rating, note

    # ---------------------------------------------------------------------------- planner tab
    def plan(self, city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, last_plan):
        """Stream a Markdown plan. Outputs: plan markdown, last-plan state, status."""
        try:
            inputs = validate_planner_inputs(city, days, when, budget, pace, interests, preferences, self.limits)
            params = clamp_params(temperature, 0.9, max_new_tokens, self.limits)
        except InputError as exc:
            yield gr.skip(), last_plan, f"⚠️ {exc}"
            return
        messages = self.planner_prompt.messages(inputs)
        title = f"# {inputs.days}-day plan for {escape_for_display(inputs.city)}\n\n"
        record = self._answer_record("planner", messages, "", params, asdict(inputs))
        yield title, last_plan, "Planning…"
        answer = ""
        try:
            for answer in self._stream(messages, params):
                record = {**record, "response": answer}
                yield title + escape_for_display(answer), record, "Planning…"
        except Exception as exc:
            log.exception("planner generation failed")
            error = friendly_generation_error(exc)
            yield title + escape_for_display(answer) + f"\n\n⚠️ {error}", last_plan, f"⚠️ {error}"
            return
        if not answer:
            yield title, last_plan, "⚠️ The model returned an empty plan. Try again."
            return
        yield title + escape_for_display(answer), record, "Done. Rate the plan below."

    # ------------------------------------------------------------------------------ feedback
    def submit_feedback(
        self, rating, reasons, comment, better_answer, answer, submission_id="", request: gr.Request = None
    ):
        """Store one rating of the session's latest answer. Outputs: status, rating, reasons, comment, better.
        `submission_id` (optional, API clients) makes a retried submission idempotent."""
        keep = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if not answer or not answer.get("response"):
            return ("⚠️ There is no answer to rate yet.", *keep)
        if rating not in ("up", "down"):
            return ("⚠️ Pick 👍 or 👎 first.", *keep)
        try:
            comment = check_length("The comment", clean_text(comment).strip(), MAX_COMMENT_CHARS)
            better_answer = check_length("The better answer", clean_text(better_answer).strip(), MAX_BETTER_ANSWER_CHARS)
            reasons = [r for r in REASONS if r in set(reasons or [])]  # canonical order, unknown values dropped
            record = FeedbackRecord(
                tab=answer["tab"],
                rating=1 if rating == "up" else -1,
                reasons=reasons,
                comment=comment,
                better_answer=better_answer,
                messages=answer["messages"],
                inputs=answer["inputs"],
                response=answer["response"],
                model_id=answer["model_id"],
                params=answer["params"],
                app_version=APP_VERSION,
                session_id=session_id_for(request),
                submission_id=(submission_id or "").strip() or None,
            )
            feedback_id = self.store.add(record)  # returns after COMMIT: only then do we say "saved"
        except (InputError, UserError) as exc:
            return (f"⚠️ {exc}", *keep)
        except Exception:
            log.exception("storing feedback failed")
            return ("⚠️ Your feedback could not be saved. Please try again.", *keep)
        return f"✅ Thank you! Feedback #{feedback_id} saved.", None, [], "", ""

    # ------------------------------------------------------------------------------ overview
    def overview(self):
        """Outputs: totals markdown, by-rating, by-reason, by-model, recent items."""
        summary = self.store.summary()
        total = sum(count for _, count in summary["rating"])
        headline = f"**{total}** feedback item(s) stored in `{escape_for_display(self.store.path.name)}`."
        recent: list[list[Any]] = []
        if self.share_feedback_data:
            for row in self.store.rows(limit=20, newest_first=True):
                recent.append([
                    row["id"], row["created_at"], row["tab"], "👍 up" if row["rating"] == 1 else "👎 down",
                    ", ".join(row["reasons"]), _short(row["comment"]), _short(row["response"]), row["model_id"],
                ])  # fmt: skip
        return (
            headline,
            [list(r) for r in summary["rating"]],
            [list(r) for r in summary["reason"]],
            [list(r) for r in summary["model"]],
            recent,
        )

    def download(self, fmt: str) -> str | None:
        if not self.share_feedback_data:
            raise gr.Error("Downloads are off on this server (start it with --auth to enable them).")
        rows = self.store.rows()
        self._prune_downloads(max_age_s=600)  # exports hold user text: keep no old copies around
        suffix = "csv" if fmt == "csv" else "jsonl"
        # a fresh name per call: two people downloading at once never share (or half-overwrite) a file
        path = self._download_dir / f"feedback-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.{suffix}"
        if suffix == "csv":
            path.write_text(rows_to_csv(rows), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    def _prune_downloads(self, max_age_s: float) -> None:
        for old in self._download_dir.glob("feedback-*"):
            try:
                if time.time() - old.stat().st_mtime > max_age_s:
                    old.unlink()
            except FileNotFoundError:  # pruned by a concurrent call
                pass


def model_concurrency(backend: ChatBackend) -> int:
    """Answers generated at once: 1 for an in-process model; a remote server (`--backend-url`) batches requests."""
    return getattr(backend, "concurrency_limit", 1)


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------- layout
def _feedback_panel(app: ChatApp, tab: str, answer_state: gr.State) -> tuple[gr.Radio, gr.Markdown]:
    """Rating, reasons, comment and better answer for the session's latest answer in one tab."""
    with gr.Accordion("Feedback on this answer", open=True, elem_id=f"{tab}-feedback"):
        with gr.Row():
            rating = gr.Radio(choices=list(RATINGS), label="Rating", elem_id=f"{tab}-rating")
            reasons = gr.CheckboxGroup(
                choices=list(REASONS), label="What was wrong? (optional)", elem_id=f"{tab}-reasons"
            )
        comment = gr.Textbox(
            label="Comment (optional)", max_length=MAX_COMMENT_CHARS, lines=2, elem_id=f"{tab}-comment"
        )
        better = gr.Textbox(
            label="A better answer (optional: it becomes training data)",
            max_length=MAX_BETTER_ANSWER_CHARS,
            lines=3,
            elem_id=f"{tab}-better",
        )
        send = gr.Button("Send feedback", elem_id=f"{tab}-send-feedback")
        status = gr.Markdown(elem_id=f"{tab}-feedback-status")
        # API clients may send an idempotency key so that retrying after a lost reply stores nothing twice
        submission_id = gr.Textbox(value="", visible=False, label="submission_id")
    send.click(
        app.submit_feedback,
        inputs=[rating, reasons, comment, better, answer_state, submission_id],
        outputs=[status, rating, reasons, comment, better],
        api_name=f"{tab}_feedback",
        concurrency_limit=8,
    )
    return rating, status


def _chat_tab(app: ChatApp, system_prompt: str) -> None:
    limits = app.limits
    turns = gr.State([])
    last_answer = gr.State(None)
    chatbot = gr.Chatbot(label=f"Chat with {app.backend.model_id}", height=420, elem_id="chatbot")
    message = gr.Textbox(
        label="Message",
        placeholder="Ask anything… (Enter to send)",
        max_length=limits.max_message_chars,
        elem_id="chat-message",
    )
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        stop = gr.Button("Stop", elem_id="chat-stop")
        clear = gr.Button("Clear", elem_id="chat-clear")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("Settings", open=False):
        system = gr.Textbox(label="System prompt", value=system_prompt, max_length=limits.max_system_prompt_chars, lines=2)
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="chat-temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
        max_new_tokens = gr.Slider(
            1, limits.max_new_tokens, value=min(256, limits.max_new_tokens), step=1, label="Max new tokens",
            elem_id="chat-max-tokens",
        )
    chat_inputs = [message, system, temperature, top_p, max_new_tokens, turns, last_answer]
    chat_outputs = [chatbot, turns, last_answer, message, status]
    common = dict(concurrency_limit=model_concurrency(app.backend), concurrency_id=MODEL_QUEUE, time_limit=600)
    sent = send.click(app.chat, chat_inputs, chat_outputs, api_name="chat", **common)
    submitted = message.submit(app.chat, chat_inputs, chat_outputs, api_visibility="private", **common)
    stop.click(None, cancels=[sent, submitted], api_visibility="private")
    clear.click(
        lambda: ([], [], None, "", ""),
        outputs=[chatbot, turns, last_answer, message, status],
        cancels=[sent, submitted],
        api_name="chat_clear",
    )
    rating, feedback_status = _feedback_panel(app, "chat", last_answer)
    chatbot.like(
        app.select_answer, inputs=[turns], outputs=[last_answer, rating, feedback_status], api_visibility="private"
    )
    # the Chatbot's own trash button clears only what is shown; forget the conversation too
    chatbot.clear(lambda: ([], None, ""), outputs=[turns, last_answer, status], api_visibility="private")


def _planner_tab(app: ChatApp) -> None:
    limits = app.limits
    last_plan = gr.State(None)
    with gr.Row():
        city = gr.Textbox(label="City (required)", max_length=limits.max_city_chars, elem_id="planner-city")
        days = gr.Number(value=3, precision=0, label=f"Days ({limits.min_days}–{limits.max_days})", elem_id="planner-days")
        when = gr.Dropdown(choices=list(WHEN_CHOICES), value="any time", label="Month or season", elem_id="planner-when")
    with gr.Row():
        budget = gr.Radio(choices=list(BUDGETS), value="mid-range", label="Budget")
        pace = gr.Radio(choices=list(PACES), value="balanced", label="Pace")
    interests = gr.CheckboxGroup(choices=list(INTERESTS), label="Interests", elem_id="planner-interests")
    preferences = gr.Textbox(
        label="Other preferences (optional)", max_length=limits.max_preferences_chars, lines=2, elem_id="planner-preferences"
    )
    with gr.Accordion("Settings", open=False):
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="planner-temperature")
        max_new_tokens = gr.Slider(
            16, limits.max_new_tokens, value=min(600, limits.max_new_tokens), step=1, label="Max new tokens",
            elem_id="planner-max-tokens",
        )
    with gr.Row():
        go = gr.Button("Plan my trip", variant="primary", elem_id="planner-go")
        stop = gr.Button("Stop", elem_id="planner-stop")
    status = gr.Markdown(elem_id="planner-status")
    plan = gr.Markdown(elem_id="planner-plan", sanitize_html=True)
    planned = go.click(
        app.plan,
        [city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, last_plan],
        [plan, last_plan, status],
        api_name="plan",
        concurrency_limit=model_concurrency(app.backend),
        concurrency_id=MODEL_QUEUE,
        time_limit=600,
    )
    stop.click(None, cancels=[planned], api_visibility="private")
    _feedback_panel(app, "planner", last_plan)


def _overview_tab(app: ChatApp) -> list[gr.components.Component]:
    headline = gr.Markdown()
    with gr.Row():
        by_rating = gr.Dataframe(headers=["rating", "count"], label="By rating", interactive=False)
        by_reason = gr.Dataframe(headers=["reason", "count"], label="By reason", interactive=False)
        by_model = gr.Dataframe(headers=["model", "👍 up", "👎 down", "total"], label="By model", interactive=False)
    recent = gr.Dataframe(
        headers=["id", "time (UTC)", "tab", "rating", "reasons", "comment", "answer", "model"],
        label="Recent items" if app.share_feedback_data else "Recent items (hidden: start the server with --auth)",
        interactive=False,
        wrap=True,
        elem_id="feedback-recent",
    )
    refresh = gr.Button("Refresh", elem_id="feedback-refresh")
    outputs = [headline, by_rating, by_reason, by_model, recent]
    refresh.click(app.overview, outputs=outputs, api_name="feedback_overview", concurrency_limit=4)
    if app.share_feedback_data:
        with gr.Row():
            fmt = gr.Radio(choices=["jsonl", "csv"], value="jsonl", label="Download format")
            prepare = gr.Button("Prepare download", elem_id="feedback-download")
        file = gr.File(label="Feedback file", interactive=False, height=120)
        prepare.click(app.download, inputs=[fmt], outputs=[file], api_name="feedback_download", concurrency_limit=2)
    return outputs


def build_app(
    backend: ChatBackend,
    feedback_db: str | Path | FeedbackStore,
    *,
    limits: Limits = Limits(),
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    planner_template: Path | None = None,
    share_feedback_data: bool = True,
    title: str = "tunelab",
) -> gr.Blocks:
    """The whole app around one loaded backend. `share_feedback_data=False` hides other users' feedback
    (recent items and the download): use it whenever the app is public without --auth."""
    store = feedback_db if isinstance(feedback_db, FeedbackStore) else FeedbackStore(feedback_db)
    prompt = PlannerPrompt(planner_template) if planner_template else PlannerPrompt()
    app = ChatApp(backend, store, limits, prompt, share_feedback_data)
    # delete_cache: Gradio's copies of served files (feedback downloads hold user text) expire after an hour.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {escape_for_display(title)}\nModel: `{escape_for_display(backend.model_id)}`")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(app, system_prompt)
            with gr.Tab("Travel Planner", id="planner"):
                _planner_tab(app)
            with gr.Tab("Feedback overview", id="overview") as overview_tab:
                outputs = _overview_tab(app)
        overview_tab.select(app.overview, outputs=outputs, api_visibility="private")
    demo.queue(default_concurrency_limit=4, max_size=128)
    demo.tunelab_app = app  # for launch() and tests: the store and backend behind this Blocks
    return demo


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Start the server (loopback only unless `host` says otherwise, no share link unless asked).
    Returns the local URL; with block=True it only returns when the server stops (Ctrl+C)."""
    try:
        _, local_url, share_url = _start_server(demo, host, port, auth, share)
    except OSError as exc:  # port taken, address not on this machine
        raise UserError(f"cannot serve on {host}:{port}: {str(exc).splitlines()[0]}") from None
    if not quiet:
        print(f"tunelab app running on {local_url}" + (f" (public link: {share_url})" if share_url else ""), flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return local_url


def _start_server(demo: gr.Blocks, host: str, port: int, auth: tuple[str, str] | None, share: bool):
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=share,
        prevent_thread_lock=True,
        show_error=False,  # errors are shown by the handlers as friendly text; no tracebacks to clients
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,  # it keeps prompts in the browser and offers Hub uploads; not for a shared app
        footer_links=["api", "gradio", "settings"],
    )
