"""Side-by-side mode: two answers to the same prompt, the user picks the better one (or "both bad").

The two answers are two samples of the served model with different seeds, or — when a candidate model is loaded
(`tunelab serve MODEL --candidate MODEL2`) — the current model and the candidate with the same seed. Which model
shows on the left is drawn at random per comparison (people favour the first answer they read); the stored pick
names the model behind each side (id + weights hash), so the pick means the same thing whatever the order.
The pair lives in server-side session state, like the answers the feedback form rates.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, NamedTuple

import gradio as gr

from tunelab.errors import UserError
from tunelab.models.inference import ChatBackend, GenerationParams
from tunelab.serve.feedback import MAX_COMMENT_CHARS, REASONS, PairwiseRecord
from tunelab.serve.handlers import (
    APP_VERSION,
    ChatApp,
    build_chat_messages,
    friendly_generation_error,
    planner_decoding,
    recorded_params,
    session_id_for,
    with_notice,
)
from tunelab.serve.limits import InputError, check_length, clamp_params, clean_text, escape_for_display
from tunelab.serve.planner import validate_planner_inputs

log = logging.getLogger(__name__)

PICKS = (("⬅️ A is better", "a"), ("B is better ➡️", "b"), ("👎 Both bad", "both_bad"))


class PairUpdate(NamedTuple):
    answer_a: Any
    answer_b: Any
    pair: Any
    status: Any


class PickResult(NamedTuple):
    status: Any
    pick: Any
    reasons: Any
    comment: Any


class SideBySide:
    """Handlers of the side-by-side panels; `app` holds the current backend, `candidate` the optional second one."""

    def __init__(self, app: ChatApp, candidate: ChatBackend | None = None, candidate_hash: str | None = None):
        self.app = app
        self.candidate = candidate
        self.candidate_hash = candidate_hash
        self._rng = random.SystemRandom()

    def _sides(self, params: GenerationParams) -> list[tuple[ChatBackend, str | None, GenerationParams]]:
        """(backend, weights hash, params) for side A and side B."""
        seed = self._rng.randrange(1, 2**31)
        current = (self.app.backend, self.app.model_hash, GenerationParams(**{**asdict(params), "seed": seed}))
        if self.candidate is None:
            other_seed = (seed + 1 + self._rng.randrange(2**30)) % 2**31 or 1
            return [
                current,
                (self.app.backend, self.app.model_hash, GenerationParams(**{**asdict(params), "seed": other_seed})),
            ]
        sides = [current, (self.candidate, self.candidate_hash, current[2])]
        self._rng.shuffle(sides)
        return sides

    def _check_can_differ(self, params: GenerationParams) -> None:
        if self.candidate is None and params.temperature == 0:
            raise InputError("Side by side with one model needs a temperature above 0 (two seeds, two samples).")

    def _backends(self) -> list[ChatBackend]:
        return [self.app.backend] + ([self.candidate] if self.candidate is not None else [])

    def _generate_pair(
        self,
        tab: str,
        messages,
        params: GenerationParams,
        inputs: dict,
        title: str = "",
        grammar: str | None = None,
        notice: str = "",
    ) -> Iterator[PairUpdate]:
        pair = {"tab": tab, "messages": messages, "inputs": inputs, "answers": []}
        shown = ["", ""]
        for index, (backend, model_hash, side_params) in enumerate(self._sides(params)):
            answer = ""
            try:
                for answer in self.app._stream(messages, side_params, backend, grammar=grammar):
                    shown[index] = title + escape_for_display(answer)
                    yield PairUpdate(*shown, gr.skip(), with_notice(f"Generating answer {'AB'[index]}…", notice))
            except Exception as exc:  # a failing model must not take the session down
                log.exception("side-by-side generation failed")
                yield PairUpdate(*shown, None, f"⚠️ {friendly_generation_error(exc)}")
                return
            if not answer.strip():
                yield PairUpdate(*shown, None, f"⚠️ Answer {'AB'[index]} came back empty. Try again.")
                return
            pair["answers"].append(
                {"response": answer, "model_id": backend.model_id, "model_hash": model_hash,
                 "params": recorded_params(side_params, grammar)}
            )  # fmt: skip
        yield PairUpdate(*shown, pair, with_notice("Done. Which answer is better? Pick below.", notice))

    # --------------------------------------------------------------------------------- events
    def compare_chat(self, message, system_prompt, temperature, top_p, max_new_tokens, turns):
        """Two answers to the chat message (with the conversation so far), streamed into panes A and B."""
        limits = self.app.limits
        try:
            message = check_length("Your message", clean_text(message).strip(), limits.max_message_chars)
            if not message:
                raise InputError("Please type a message first.")
            system_prompt = check_length("The system prompt", clean_text(system_prompt), limits.max_system_prompt_chars)
            params = clamp_params(temperature, top_p, max_new_tokens, limits)
            self._check_can_differ(params)
        except InputError as exc:
            yield PairUpdate(gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}")
            return
        messages = build_chat_messages(system_prompt, list(turns or []), message, limits)
        yield from self._generate_pair("chat", messages, params, {"message": message, "system_prompt": system_prompt})

    def compare_plans(
        self, city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, day_format=False
    ):
        """Two plans for the same trip, streamed into panes A and B (both under the day-plan grammar, or neither)."""
        try:
            inputs = validate_planner_inputs(city, days, when, budget, pace, interests, preferences, self.app.limits)
            params = clamp_params(temperature, 0.9, max_new_tokens, self.app.limits)
            self._check_can_differ(params)
        except InputError as exc:
            yield PairUpdate(gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}")
            return
        grammar, params, notice = planner_decoding(
            bool(day_format), inputs.days, params, self.app.limits, self._backends()
        )
        messages = self.app.planner_prompt.messages(inputs)
        title = f"# {inputs.days}-day plan for {escape_for_display(inputs.city)}\n\n"
        yield from self._generate_pair("planner", messages, params, asdict(inputs), title, grammar, notice)

    def submit_pick(self, pick, reasons, comment, pair, submission_id="", request: gr.Request = None):
        """Store which of the two answers is better (or both bad), with reasons and comment."""
        keep = (gr.skip(), gr.skip(), gr.skip())
        if not pair or len(pair.get("answers", [])) != 2:
            return PickResult("⚠️ There is no pair of answers to compare yet.", *keep)
        if pick not in ("a", "b", "both_bad"):
            return PickResult("⚠️ Pick A, B or both bad first.", *keep)
        a, b = pair["answers"]
        try:
            record = PairwiseRecord(
                tab=pair["tab"], messages=pair["messages"], inputs=pair["inputs"],
                answer_a=a["response"], answer_b=b["response"],
                model_a_id=a["model_id"], model_a_hash=a["model_hash"], params_a=a["params"],
                model_b_id=b["model_id"], model_b_hash=b["model_hash"], params_b=b["params"],
                pick=pick, reasons=[r for r in REASONS if r in set(reasons or [])],
                comment=check_length("The comment", clean_text(comment).strip(), MAX_COMMENT_CHARS),
                app_version=APP_VERSION, session_id=session_id_for(request),
                submission_id=(submission_id or "").strip() or None,
            )  # fmt: skip
            pick_id = self.app.store.add_pairwise(record)
        except (InputError, UserError) as exc:
            return PickResult(f"⚠️ {exc}", *keep)
        except Exception:
            log.exception("storing a side-by-side pick failed")
            return PickResult("⚠️ Your pick could not be saved. Please try again.", *keep)
        return PickResult(f"✅ Thank you! Pick #{pick_id} saved.", None, [], "")

    def send_on_enter(
        self, side_by_side, message, system_prompt, temperature, top_p, max_new_tokens, turns, last_answer
    ):
        """Enter in the chat box: one answer (ChatUpdate fields) or, in side-by-side mode, two (PairUpdate fields)."""
        from tunelab.serve.handlers import ChatUpdate

        no_chat = tuple(gr.skip() for _ in ChatUpdate._fields)
        no_pair = tuple(gr.skip() for _ in PairUpdate._fields)
        if side_by_side:
            for update in self.compare_chat(message, system_prompt, temperature, top_p, max_new_tokens, turns):
                yield (*no_chat, *update)
        else:
            for update in self.app.chat(message, system_prompt, temperature, top_p, max_new_tokens, turns, last_answer):
                yield (*update, *no_pair)
