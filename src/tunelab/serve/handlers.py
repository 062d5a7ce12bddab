"""The app's event handlers (Chat, Travel Planner, feedback, overview), independent of the page layout.

Each handler returns (or yields) a NamedTuple whose fields name the components it updates; app.py builds
each event's `outputs` list from the same NamedTuple, by field name, so the two cannot drift apart.
What was generated (prompt, full answer, parameters) is kept in server-side session state, so feedback
always describes the answer the model really gave, not what a client claims it gave. Generation errors
become a visible message; the server keeps running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from tunelab import __version__
from tunelab.errors import UserError
from tunelab.eval.plan_grammar import day_plan_grammar, token_budget
from tunelab.models.inference import ChatBackend, GenerationParams, takes_grammar
from tunelab.serve.feedback_export import rows_to_csv
from tunelab.serve.feedback_store import (
    MAX_BETTER_ANSWER_CHARS,
    MAX_COMMENT_CHARS,
    FeedbackRecord,
    FeedbackStore,
    canonical_reasons,
)
from tunelab.serve.limits import (
    PLANNER_DAY_FORMAT,
    InputError,
    Limits,
    check_length,
    clamp_params,
    clean_text,
    escape_for_display,
    fit_history,
)
from tunelab.serve.planner import PlannerPrompt, validate_planner_inputs

log = logging.getLogger(__name__)

APP_VERSION = f"tunelab {__version__}"
PLANNER_TOP_P = 0.9  # the Travel Planner has no top-p slider


class ChatUpdate(NamedTuple):
    chatbot: Any
    turns: Any
    last_answer: Any
    message: Any
    status: Any


class AnswerSelected(NamedTuple):
    last_answer: Any
    rating: Any
    status: Any


class PlanUpdate(NamedTuple):
    plan: Any
    last_plan: Any
    status: Any


class FeedbackResult(NamedTuple):
    status: Any
    rating: Any
    reasons: Any
    comment: Any
    better_answer: Any


class Overview(NamedTuple):
    headline: Any
    by_rating: Any
    by_reason: Any
    by_model: Any
    recent: Any


def session_id_for(request: gr.Request | None) -> str:
    """An anonymous id per browser session (a hash, so the DB cannot be joined with Gradio's own ids)."""
    raw = getattr(request, "session_hash", None) or "no-session"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


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


def default_day_format(backend: ChatBackend) -> bool:
    """Whether the planner's "Follow the day-by-day format" box starts ticked: PLANNER_DAY_FORMAT wherever the
    served backend takes a grammar (an unticked box elsewhere: no notice on every plan)."""
    return PLANNER_DAY_FORMAT and takes_grammar(backend)


def planner_decoding(
    day_format: bool, days: int, params: GenerationParams, limits: Limits, backends: list[ChatBackend]
) -> tuple[str | None, GenerationParams, str]:
    """The Travel Planner's "Follow the day-by-day format (grammar)" box: (grammar, params, notice).

    Ticked, and every backend that will answer takes a grammar (llama.cpp): the day-plan grammar for `days`, and as
    `tunelab eval --grammar` does (eval/domain.answer_in_llama_cpp) the budget of the longest plan it allows rather
    than the slider's, so a constrained plan is not cut — within the server's max_new_tokens. A backend that cannot
    take one (transformers, a remote OpenAI-compatible server): no grammar for any side (a side-by-side pair stays
    comparable) and a one-line notice for the status. Not ticked: (None, params, "")."""
    if not day_format:
        return None, params, ""
    unable = next((backend for backend in backends if not takes_grammar(backend)), None)
    if unable is not None:
        return None, params, (f"ℹ️ Planned without the day-by-day format: the {unable.kind} backend "
                              "cannot take a grammar (llama.cpp .gguf models only).")  # fmt: skip
    budget = min(token_budget(days), limits.max_new_tokens)
    return day_plan_grammar(days), replace(params, max_new_tokens=budget), ""


def with_notice(status: str, notice: str) -> str:
    return f"{status} {notice}" if notice else status


def recorded_params(params: GenerationParams, grammar: str | None) -> dict:
    """Generation parameters as stored with feedback; `day_grammar: true` marks a plan decoded under the grammar."""
    return {**asdict(params), "day_grammar": True} if grammar else asdict(params)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for a model: what it sees, how it decodes, and what feedback stores about it.
    `title`: Markdown shown above the answer (the plan's heading); `notice`: a one-line note for the status."""

    tab: str
    messages: list[dict[str, str]]
    inputs: dict[str, Any]
    params: GenerationParams
    grammar: str | None = None
    title: str = ""
    notice: str = ""

    def shown(self, answer: str) -> str:
        """The answer as the page shows it: under the title, escaped."""
        return self.title + escape_for_display(answer)

    def answer_record(self, response: str, model_id: str, model_hash: str | None) -> dict:
        """The answer as session state keeps it for feedback (what the model saw, said, and which weights said it)."""
        return {
            "tab": self.tab,
            "messages": self.messages,
            "response": response,
            "params": recorded_params(self.params, self.grammar),
            "inputs": self.inputs,
            "model_id": model_id,
            "model_hash": model_hash,
        }


def stream_answer(backend: ChatBackend, request: GenerationRequest) -> Iterator[str]:
    """Accumulated answer text; the backend's generator is closed even when the user presses Stop.
    `request.grammar` only for a backend that takes one (see `planner_decoding`)."""
    pieces = (
        backend.stream_chat(request.messages, request.params, grammar=request.grammar)
        if request.grammar
        else backend.stream_chat(request.messages, request.params)
    )
    answer = ""
    try:
        for piece in pieces:
            answer += piece
            yield answer
    finally:
        close = getattr(pieces, "close", None)
        if close:
            close()


def submission_fields(reasons: Any, comment: Any, submission_id: Any, request: gr.Request | None) -> dict[str, Any]:
    """What every stored submission carries besides the answer(s): reasons in canonical order (unknown values
    dropped), the comment (InputError when too long), app version, anonymous session and the client's id."""
    return {
        "reasons": canonical_reasons(reasons),
        "comment": check_length("The comment", clean_text(comment).strip(), MAX_COMMENT_CHARS),
        "app_version": APP_VERSION,
        "session_id": session_id_for(request),
        "submission_id": (submission_id or "").strip() or None,
    }


class ChatApp:
    """Event handlers; one instance per server, shared by all sessions (per-session data lives in gr.State)."""

    def __init__(
        self,
        backend: ChatBackend,
        store: FeedbackStore,
        limits: Limits = Limits(),
        planner_prompt: PlannerPrompt | None = None,
        share_feedback_data: bool = True,
        model_hash: str | None = None,
    ):
        self.backend = backend
        self.model_hash = model_hash  # sha256 of the served weights (serve/fingerprint.py), stored with feedback
        self.store = store
        self.limits = limits
        self.planner_prompt = planner_prompt or PlannerPrompt()
        self.share_feedback_data = share_feedback_data
        self._download_dir: Path | None = None  # made on the first download (see _downloads)

    # ------------------------------------------------------------------------------- requests
    def chat_request(self, message, system_prompt, temperature, top_p, max_new_tokens, turns) -> GenerationRequest:
        """A chat message (after the conversation `turns`) as a request; InputError names what the user must fix."""
        message = check_length("Your message", clean_text(message).strip(), self.limits.max_message_chars)
        if not message:
            raise InputError("Please type a message first.")
        system_prompt = check_length(
            "The system prompt", clean_text(system_prompt), self.limits.max_system_prompt_chars
        )
        params = clamp_params(temperature, top_p, max_new_tokens, self.limits)
        messages = build_chat_messages(system_prompt, list(turns or []), message, self.limits)
        return GenerationRequest("chat", messages, {"message": message, "system_prompt": system_prompt}, params)

    def plan_request(
        self, city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, day_format=False,
        backends: list[ChatBackend] | None = None,
    ) -> GenerationRequest:  # fmt: skip
        """A trip as a planner request; InputError names what the user must fix. `day_format`: decode under the
        day-plan grammar if every one of `backends` (default: the served one) takes it (`planner_decoding`)."""
        inputs = validate_planner_inputs(city, days, when, budget, pace, interests, preferences, self.limits)
        params = clamp_params(temperature, PLANNER_TOP_P, max_new_tokens, self.limits)
        grammar, params, notice = planner_decoding(
            bool(day_format), inputs.days, params, self.limits, backends or [self.backend]
        )
        title = f"# {inputs.days}-day plan for {escape_for_display(inputs.city)}\n\n"
        messages = self.planner_prompt.messages(inputs)
        return GenerationRequest("planner", messages, asdict(inputs), params, grammar, title, notice)

    # ------------------------------------------------------------------------------- chat tab
    def chat(self, message, system_prompt, temperature, top_p, max_new_tokens, turns, last_answer):
        """Stream one reply as ChatUpdates."""
        turns = list(turns or [])
        try:
            request = self.chat_request(message, system_prompt, temperature, top_p, max_new_tokens, turns)
        except InputError as exc:
            yield ChatUpdate(chat_display(turns), turns, last_answer, gr.skip(), f"⚠️ {exc}")
            return
        turn = {"user": request.inputs["message"], "assistant": ""}
        turns.append(turn)
        record = request.answer_record("", self.backend.model_id, self.model_hash)
        yield ChatUpdate(chat_display(turns), turns, last_answer, "", "Generating…")
        try:
            for answer in stream_answer(self.backend, request):
                turn["assistant"] = answer
                record = {**record, "response": answer}
                turn["record"] = record  # kept per turn: the 👍/👎 on an older message can select it later
                yield ChatUpdate(chat_display(turns), turns, record, gr.skip(), "Generating…")
        except Exception as exc:  # never let a model failure take the session (or server) down
            log.exception("chat generation failed")
            turn.pop("record", None)
            turn["error"] = friendly_generation_error(exc)
            yield ChatUpdate(chat_display(turns), turns, last_answer, gr.skip(), f"⚠️ {turn['error']}")
            return
        if not turn["assistant"]:
            turn["error"] = "The model returned an empty answer. Try again or rephrase."
            yield ChatUpdate(chat_display(turns), turns, last_answer, gr.skip(), f"⚠️ {turn['error']}")
            return
        yield ChatUpdate(chat_display(turns), turns, record, gr.skip(), "Done. Rate the answer below.")

    def select_answer(self, turns, event: gr.LikeData):
        """The 👍/👎 under any chat answer: make that answer the one the feedback form rates."""
        turn = turn_for_message(turns or [], event.index)
        if turn is None or not turn.get("record"):
            return AnswerSelected(gr.skip(), gr.skip(), "⚠️ That message cannot be rated.")
        number = (turns or []).index(turn) + 1
        rating = "up" if event.liked is True else "down" if event.liked is False else None
        note = f"Rating answer {number}: add reasons or a better answer if you like, then press **Send feedback**."
        return AnswerSelected(turn["record"], rating, note)

    # ---------------------------------------------------------------------------- planner tab
    def plan(
        self,
        city,
        days,
        when,
        budget,
        pace,
        interests,
        preferences,
        temperature,
        max_new_tokens,
        last_plan,
        day_format=False,
    ):
        """Stream a Markdown plan as PlanUpdates. `day_format`: decode under the day-plan grammar
        (`planner_decoding`)."""
        try:
            request = self.plan_request(
                city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, day_format
            )
        except InputError as exc:
            yield PlanUpdate(gr.skip(), last_plan, f"⚠️ {exc}")
            return
        record = request.answer_record("", self.backend.model_id, self.model_hash)
        planning = with_notice("Planning…", request.notice)
        yield PlanUpdate(request.title, last_plan, planning)
        answer = ""
        try:
            for answer in stream_answer(self.backend, request):
                record = {**record, "response": answer}
                yield PlanUpdate(request.shown(answer), record, planning)
        except Exception as exc:
            log.exception("planner generation failed")
            error = friendly_generation_error(exc)
            yield PlanUpdate(
                request.shown(answer) + f"\n\n⚠️ {error}", last_plan, with_notice(f"⚠️ {error}", request.notice)
            )
            return
        if not answer:
            empty = with_notice("⚠️ The model returned an empty plan. Try again.", request.notice)
            yield PlanUpdate(request.title, last_plan, empty)
            return
        yield PlanUpdate(request.shown(answer), record, with_notice("Done. Rate the plan below.", request.notice))

    # ------------------------------------------------------------------------------ feedback
    def submit_feedback(
        self, rating, reasons, comment, better_answer, answer, submission_id="", request: gr.Request = None
    ):
        """Store one rating of the session's latest answer.
        `submission_id` (optional, API clients) makes a retried submission idempotent."""
        keep = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if not answer or not answer.get("response"):
            return FeedbackResult("⚠️ There is no answer to rate yet.", *keep)
        if rating not in ("up", "down"):
            return FeedbackResult("⚠️ Pick 👍 or 👎 first.", *keep)
        try:
            common = submission_fields(reasons, comment, submission_id, request)
            better_answer = check_length(
                "The better answer", clean_text(better_answer).strip(), MAX_BETTER_ANSWER_CHARS
            )
            record = FeedbackRecord(
                tab=answer["tab"],
                rating=1 if rating == "up" else -1,
                better_answer=better_answer,
                messages=answer["messages"],
                inputs=answer["inputs"],
                response=answer["response"],
                model_id=answer["model_id"],
                model_hash=answer.get("model_hash"),
                params=answer["params"],
                **common,
            )
            feedback_id = self.store.add(record)  # returns after COMMIT: only then do we say "saved"
        except (InputError, UserError) as exc:
            return FeedbackResult(f"⚠️ {exc}", *keep)
        except Exception:
            log.exception("storing feedback failed")
            return FeedbackResult("⚠️ Your feedback could not be saved. Please try again.", *keep)
        return FeedbackResult(f"✅ Thank you! Feedback #{feedback_id} saved.", None, [], "", "")

    # ------------------------------------------------------------------------------ overview
    def overview(self):
        """Totals, counts by rating/reason/model, and (when shared) the recent items."""
        summary = self.store.summary()
        total = sum(count for _, count in summary["rating"])
        headline = f"**{total}** feedback item(s) stored in `{escape_for_display(self.store.path.name)}`."
        picks = self.store.pairwise_count()
        if picks:
            headline += f" **{picks}** side-by-side pick(s)."
        recent: list[list[Any]] = []
        if self.share_feedback_data:
            for row in self.store.rows(limit=20, newest_first=True):
                recent.append([
                    row["id"], row["created_at"], row["tab"], "👍 up" if row["rating"] == 1 else "👎 down",
                    ", ".join(row["reasons"]), _short(row["comment"]), _short(row["response"]), row["model_id"],
                ])  # fmt: skip
        return Overview(
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
        path = self._downloads() / f"feedback-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.{suffix}"
        if suffix == "csv":
            path.write_text(rows_to_csv(rows), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    def _downloads(self) -> Path:
        """The folder Gradio serves downloads from. It must sit in the system temp folder (Gradio serves files
        only from there or the working directory); it is deleted with this app, at the latest when the process
        exits, so no app instance leaves a `tunelab-feedback-*` folder behind."""
        if self._download_dir is None:
            self._download_dir = Path(tempfile.mkdtemp(prefix="tunelab-feedback-"))
            weakref.finalize(self, shutil.rmtree, self._download_dir, True)
        return self._download_dir

    def _prune_downloads(self, max_age_s: float) -> None:
        if self._download_dir is None:
            return
        for old in self._download_dir.glob("feedback-*"):
            try:
                if time.time() - old.stat().st_mtime > max_age_s:
                    old.unlink()
            except FileNotFoundError:  # pruned by a concurrent call
                pass


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
