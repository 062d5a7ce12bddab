"""The Gradio app: Chat, Travel Planner, feedback on every answer, and a feedback overview.

    backend = load_backend("model.gguf", threads=2)
    demo = build_app(backend, "feedback.db")
    url = launch(demo, host="127.0.0.1", port=7860, auth=None)

This module is the page layout only: the handlers are in handlers.py (side-by-side ones in side_by_side.py),
input limits in limits.py, the Travel Planner's choices and prompt in planner.py. One backend (one model load) is
shared by all sessions.
llama.cpp is not thread-safe, so every generating event shares one Gradio concurrency group of size 1
(`MODEL_QUEUE`); other users wait in Gradio's queue.
A remote backend (`--backend-url`) sets its own size: the server batches concurrent requests. Feedback and overview
events run in parallel with it.
"""

from __future__ import annotations

import os
from pathlib import Path

# No usage analytics from a server that handles people's prompts (must be set before gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from tunelab.errors import UserError  # noqa: E402
from tunelab.models.inference import ChatBackend  # noqa: E402
from tunelab.serve.feedback_store import (  # noqa: E402
    MAX_BETTER_ANSWER_CHARS,
    MAX_COMMENT_CHARS,
    PICKS,
    REASONS,
    FeedbackStore,
)
from tunelab.serve.handlers import (  # noqa: E402
    AnswerSelected,
    ChatApp,
    ChatUpdate,
    FeedbackResult,
    Overview,
    PlanUpdate,
    default_day_format,
)
from tunelab.serve.limits import PLANNER_MAX_NEW_TOKENS, Limits, escape_for_display  # noqa: E402
from tunelab.serve.planner import BUDGETS, INTERESTS, PACES, WHEN_CHOICES, PlannerPrompt  # noqa: E402
from tunelab.serve.side_by_side import PairUpdate, PickResult, SideBySide  # noqa: E402

MODEL_QUEUE = "model"  # concurrency_id shared by every event that runs the model
RATINGS = (("👍 Good", "up"), ("👎 Bad", "down"))
DEFAULT_SYSTEM_PROMPT = "You are a helpful, concise assistant."


def model_concurrency(backend: ChatBackend) -> int:
    """Answers generated at once: 1 for an in-process model; a remote server (`--backend-url`) batches requests."""
    return getattr(backend, "concurrency_limit", 1)


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
        outputs=list(
            FeedbackResult(status=status, rating=rating, reasons=reasons, comment=comment, better_answer=better)
        ),
        api_name=f"{tab}_feedback",
        concurrency_limit=8,
    )
    return rating, status


def _side_by_side_panel(sbs: SideBySide, tab: str, visible: bool) -> tuple[gr.Group, list[gr.components.Component]]:
    """Answers A and B next to each other, the pick, reasons and comment. Returns the group and PairUpdate outputs."""
    pair = gr.State(None)
    with gr.Group(visible=visible, elem_id=f"{tab}-side-by-side-panel") as group:
        with gr.Row():
            answer_a = gr.Markdown(label="Answer A", elem_id=f"{tab}-answer-a", sanitize_html=True, min_height=80)
            answer_b = gr.Markdown(label="Answer B", elem_id=f"{tab}-answer-b", sanitize_html=True, min_height=80)
        status = gr.Markdown(elem_id=f"{tab}-pair-status")
        with gr.Row():
            pick = gr.Radio(
                choices=[(label, value) for value, label in PICKS.items()],
                label="Which answer is better?",
                elem_id=f"{tab}-pick",
            )
            reasons = gr.CheckboxGroup(
                choices=list(REASONS), label="What was wrong with the other? (optional)", elem_id=f"{tab}-pick-reasons"
            )
        comment = gr.Textbox(
            label="Comment (optional)", max_length=MAX_COMMENT_CHARS, lines=2, elem_id=f"{tab}-pick-comment"
        )
        send = gr.Button("Send pick", elem_id=f"{tab}-send-pick")
        pick_status = gr.Markdown(elem_id=f"{tab}-pick-status")
        submission_id = gr.Textbox(value="", visible=False, label="submission_id")
    send.click(
        sbs.submit_pick,
        inputs=[pick, reasons, comment, pair, submission_id],
        outputs=list(PickResult(status=pick_status, pick=pick, reasons=reasons, comment=comment)),
        api_name=f"{tab}_pick",
        concurrency_limit=8,
    )
    return group, list(PairUpdate(answer_a=answer_a, answer_b=answer_b, pair=pair, status=status))


def _mode_switch(tab: str, on: bool, single: gr.Button, double: gr.Button, panel: gr.Group) -> gr.Checkbox:
    switch = gr.Checkbox(
        value=on, label="Side by side: two answers, pick the better one", elem_id=f"{tab}-side-by-side"
    )
    switch.change(
        lambda enabled: (gr.update(visible=not enabled), gr.update(visible=enabled), gr.update(visible=enabled)),
        inputs=[switch], outputs=[single, double, panel], api_visibility="private",
    )  # fmt: skip
    return switch


def _chat_tab(app: ChatApp, sbs: SideBySide, system_prompt: str, side_by_side: bool) -> None:
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
        send = gr.Button("Send", variant="primary", elem_id="chat-send", visible=not side_by_side)
        compare = gr.Button("Send (two answers)", variant="primary", elem_id="chat-compare", visible=side_by_side)
        stop = gr.Button("Stop", elem_id="chat-stop")
        clear = gr.Button("Clear", elem_id="chat-clear")
    status = gr.Markdown(elem_id="chat-status")
    panel, pair_outputs = _side_by_side_panel(sbs, "chat", side_by_side)
    switch = _mode_switch("chat", side_by_side, send, compare, panel)
    with gr.Accordion("Settings", open=False):
        system = gr.Textbox(
            label="System prompt", value=system_prompt, max_length=limits.max_system_prompt_chars, lines=2
        )
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="chat-temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
        max_new_tokens = gr.Slider(
            1,
            limits.max_new_tokens,
            value=min(256, limits.max_new_tokens),
            step=1,
            label="Max new tokens",
            elem_id="chat-max-tokens",
        )
    chat_inputs = [message, system, temperature, top_p, max_new_tokens, turns, last_answer]
    chat_outputs = list(
        ChatUpdate(chatbot=chatbot, turns=turns, last_answer=last_answer, message=message, status=status)
    )
    common = dict(concurrency_limit=model_concurrency(app.backend), concurrency_id=MODEL_QUEUE, time_limit=600)
    sent = send.click(app.chat, chat_inputs, chat_outputs, api_name="chat", **common)
    compared = compare.click(sbs.compare_chat, chat_inputs[:-1], pair_outputs, api_name="chat_compare", **common)
    submitted = message.submit(
        sbs.send_on_enter, [switch, *chat_inputs], chat_outputs + pair_outputs, api_visibility="private", **common
    )
    stop.click(None, cancels=[sent, compared, submitted], api_visibility="private")
    clear.click(
        lambda: ChatUpdate(chatbot=[], turns=[], last_answer=None, message="", status=""),
        outputs=chat_outputs,
        cancels=[sent, compared, submitted],
        api_name="chat_clear",
    )
    rating, feedback_status = _feedback_panel(app, "chat", last_answer)
    chatbot.like(
        app.select_answer,
        inputs=[turns],
        outputs=list(AnswerSelected(last_answer=last_answer, rating=rating, status=feedback_status)),
        api_visibility="private",
    )
    # the Chatbot's own trash button clears only what is shown; forget the conversation too
    chatbot.clear(lambda: ([], None, ""), outputs=[turns, last_answer, status], api_visibility="private")


def _planner_tab(app: ChatApp, sbs: SideBySide, side_by_side: bool) -> None:
    limits = app.limits
    last_plan = gr.State(None)
    with gr.Row():
        city = gr.Textbox(label="City (required)", max_length=limits.max_city_chars, elem_id="planner-city")
        days = gr.Number(
            value=3, precision=0, label=f"Days ({limits.min_days}–{limits.max_days})", elem_id="planner-days"
        )
        when = gr.Dropdown(
            choices=list(WHEN_CHOICES), value="any time", label="Month or season", elem_id="planner-when"
        )
    with gr.Row():
        budget = gr.Radio(choices=list(BUDGETS), value="mid-range", label="Budget")
        pace = gr.Radio(choices=list(PACES), value="balanced", label="Pace")
    interests = gr.CheckboxGroup(choices=list(INTERESTS), label="Interests", elem_id="planner-interests")
    preferences = gr.Textbox(
        label="Other preferences (optional)",
        max_length=limits.max_preferences_chars,
        lines=2,
        elem_id="planner-preferences",
    )
    with gr.Accordion("Settings", open=False):
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="planner-temperature")
        max_new_tokens = gr.Slider(
            16,
            limits.max_new_tokens,
            value=min(PLANNER_MAX_NEW_TOKENS, limits.max_new_tokens),
            step=1,
            label="Max new tokens",
            elem_id="planner-max-tokens",
        )
        day_format = gr.Checkbox(
            value=default_day_format(app.backend), label="Follow the day-by-day format (grammar)",
            elem_id="planner-day-format",
            info="Exactly one \"Day n:\" section per day, 2–3 items each, under a llama.cpp grammar "
                 "(.gguf models only; the plan then gets the tokens the format needs, whatever Max new tokens says).",
        )  # fmt: skip
    with gr.Row():
        go = gr.Button("Plan my trip", variant="primary", elem_id="planner-go", visible=not side_by_side)
        compare = gr.Button("Two plans to compare", variant="primary", elem_id="planner-compare", visible=side_by_side)
        stop = gr.Button("Stop", elem_id="planner-stop")
    status = gr.Markdown(elem_id="planner-status")
    panel, pair_outputs = _side_by_side_panel(sbs, "planner", side_by_side)
    _mode_switch("planner", side_by_side, go, compare, panel)
    plan = gr.Markdown(elem_id="planner-plan", sanitize_html=True)
    trip = [city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens]
    compared = compare.click(
        sbs.compare_plans, [*trip, day_format], pair_outputs, api_name="plan_compare",
        concurrency_limit=1, concurrency_id=MODEL_QUEUE, time_limit=600,
    )  # fmt: skip
    planned = go.click(
        app.plan,
        [*trip, last_plan, day_format],
        list(PlanUpdate(plan=plan, last_plan=last_plan, status=status)),
        api_name="plan",
        concurrency_limit=model_concurrency(app.backend),
        concurrency_id=MODEL_QUEUE,
        time_limit=600,
    )
    stop.click(None, cancels=[planned, compared], api_visibility="private")
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
    outputs = list(
        Overview(headline=headline, by_rating=by_rating, by_reason=by_reason, by_model=by_model, recent=recent)
    )
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
    model_hash: str | None = None,
    candidate: ChatBackend | None = None,
    candidate_hash: str | None = None,
    side_by_side: bool = False,
) -> gr.Blocks:
    """The whole app around one loaded backend. `share_feedback_data=False` hides other users' feedback
    (recent items and the download): use it whenever the app is public without --auth.
    `candidate`: a second model for side-by-side picks against the served one. `side_by_side`: the chat starts in
    side-by-side mode (the planner also does whenever a candidate is loaded); a checkbox switches either tab."""
    store = feedback_db if isinstance(feedback_db, FeedbackStore) else FeedbackStore(feedback_db)
    prompt = PlannerPrompt(planner_template) if planner_template else PlannerPrompt()
    app = ChatApp(backend, store, limits, prompt, share_feedback_data, model_hash=model_hash)
    sbs = SideBySide(app, candidate, candidate_hash)
    # delete_cache: Gradio's copies of served files (feedback downloads hold user text) expire after an hour.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        versus = f" · candidate: `{escape_for_display(candidate.model_id)}`" if candidate else ""
        gr.Markdown(f"# {escape_for_display(title)}\nModel: `{escape_for_display(backend.model_id)}`{versus}")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(app, sbs, system_prompt, side_by_side)
            with gr.Tab("Travel Planner", id="planner"):
                _planner_tab(app, sbs, side_by_side or candidate is not None)
            with gr.Tab("Feedback overview", id="overview") as overview_tab:
                outputs = _overview_tab(app)
        overview_tab.select(app.overview, outputs=outputs, api_visibility="private")
    demo.queue(default_concurrency_limit=4, max_size=128)
    demo.tunelab_app = app  # for launch() and tests: the store and backend behind this Blocks
    demo.tunelab_side_by_side = sbs
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
