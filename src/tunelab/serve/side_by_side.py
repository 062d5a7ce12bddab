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
from dataclasses import replace
from typing import Any, NamedTuple

import gradio as gr

from tunelab.errors import UserError
from tunelab.models.inference import ChatBackend, GenerationParams
from tunelab.serve.feedback_store import PICKS, PairwiseRecord
from tunelab.serve.handlers import (
    ChatApp,
    ChatUpdate,
    GenerationRequest,
    friendly_generation_error,
    stream_answer,
    submission_fields,
    with_notice,
)
from tunelab.serve.limits import InputError

log = logging.getLogger(__name__)


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

    def _sides(self, request: GenerationRequest) -> list[tuple[ChatBackend, str | None, GenerationRequest]]:
        """(backend, weights hash, request with its seed) for side A and side B."""
        seed = self._rng.randrange(1, 2**31)
        current = (self.app.backend, self.app.model_hash, _with_seed(request, seed))
        if self.candidate is None:
            other_seed = (seed + 1 + self._rng.randrange(2**30)) % 2**31 or 1
            return [current, (self.app.backend, self.app.model_hash, _with_seed(request, other_seed))]
        sides = [current, (self.candidate, self.candidate_hash, current[2])]
        self._rng.shuffle(sides)
        return sides

    def _check_can_differ(self, params: GenerationParams) -> None:
        if self.candidate is None and params.temperature == 0:
            raise InputError("Side by side with one model needs a temperature above 0 (two seeds, two samples).")

    def _backends(self) -> list[ChatBackend]:
        return [self.app.backend] + ([self.candidate] if self.candidate is not None else [])

    def _generate_pair(self, request: GenerationRequest) -> Iterator[PairUpdate]:
        pair = {"tab": request.tab, "messages": request.messages, "inputs": request.inputs, "answers": []}
        shown = ["", ""]
        for index, (backend, model_hash, side) in enumerate(self._sides(request)):
            answer = ""
            try:
                for answer in stream_answer(backend, side):
                    shown[index] = side.shown(answer)
                    status = with_notice(f"Generating answer {'AB'[index]}…", request.notice)
                    yield PairUpdate(*shown, gr.skip(), status)
            except Exception as exc:  # a failing model must not take the session down
                log.exception("side-by-side generation failed")
                yield PairUpdate(*shown, None, f"⚠️ {friendly_generation_error(exc)}")
                return
            if not answer.strip():
                yield PairUpdate(*shown, None, f"⚠️ Answer {'AB'[index]} came back empty. Try again.")
                return
            pair["answers"].append(side.answer_record(answer, backend.model_id, model_hash))
        yield PairUpdate(*shown, pair, with_notice("Done. Which answer is better? Pick below.", request.notice))

    # --------------------------------------------------------------------------------- events
    def compare_chat(self, message, system_prompt, temperature, top_p, max_new_tokens, turns):
        """Two answers to the chat message (with the conversation so far), streamed into panes A and B."""
        try:
            request = self.app.chat_request(message, system_prompt, temperature, top_p, max_new_tokens, turns)
            self._check_can_differ(request.params)
        except InputError as exc:
            yield PairUpdate(gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}")
            return
        yield from self._generate_pair(request)

    def compare_plans(
        self, city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, day_format=False
    ):
        """Two plans for the same trip, streamed into panes A and B (both under the day-plan grammar, or neither)."""
        try:
            request = self.app.plan_request(
                city, days, when, budget, pace, interests, preferences, temperature, max_new_tokens, day_format,
                backends=self._backends(),
            )  # fmt: skip
            self._check_can_differ(request.params)
        except InputError as exc:
            yield PairUpdate(gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}")
            return
        yield from self._generate_pair(request)

    def submit_pick(self, pick, reasons, comment, pair, submission_id="", request: gr.Request = None):
        """Store which of the two answers is better (or both bad), with reasons and comment."""
        keep = (gr.skip(), gr.skip(), gr.skip())
        if not pair or len(pair.get("answers", [])) != 2:
            return PickResult("⚠️ There is no pair of answers to compare yet.", *keep)
        if pick not in PICKS:
            return PickResult("⚠️ Pick A, B or both bad first.", *keep)
        a, b = pair["answers"]
        try:
            record = PairwiseRecord(
                tab=pair["tab"], messages=pair["messages"], inputs=pair["inputs"],
                answer_a=a["response"], answer_b=b["response"],
                model_a_id=a["model_id"], model_a_hash=a["model_hash"], params_a=a["params"],
                model_b_id=b["model_id"], model_b_hash=b["model_hash"], params_b=b["params"],
                pick=pick, **submission_fields(reasons, comment, submission_id, request),
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
        no_chat = tuple(gr.skip() for _ in ChatUpdate._fields)
        no_pair = tuple(gr.skip() for _ in PairUpdate._fields)
        if side_by_side:
            for update in self.compare_chat(message, system_prompt, temperature, top_p, max_new_tokens, turns):
                yield (*no_chat, *update)
        else:
            for update in self.app.chat(message, system_prompt, temperature, top_p, max_new_tokens, turns, last_answer):
                yield (*update, *no_pair)


def _with_seed(request: GenerationRequest, seed: int) -> GenerationRequest:
    return replace(request, params=replace(request.params, seed=seed))
