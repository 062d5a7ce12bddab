"""An automatic rubric for travel-planning answers: one named function per criterion, a score per answer.

    prompt = TravelPrompt(prompt="Plan 2 days in Lisbon ...", city="Lisbon", days=2, preferences=["food"])
    result = score_answer(Answer(text=reply, finished=True), prompt)
    result.score, result.criteria["days_honoured"]

Each criterion returns a score in [0, 1], or None when it cannot be judged (the prompt has no `city` / `days` /
`preferences`, or it is unknown whether generation stopped at end-of-turn); the answer's score is the mean
of the criteria that could be judged. The rubric checks form (the plan the user asked for), not facts: a
plan naming the wrong palace passes. That is what a judge model or a person is for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import UserError

SHIPPED_TRAVEL_PROMPTS = Path(__file__).resolve().parent / "travel_prompts.jsonl"

# A "Day N" section starts a line, optionally after Markdown heading/list/bold markers: "## Day 2", "**Day 2:**",
# "- Day 2 -", "1. Day 1". "on day 2 of your trip" inside a sentence is not a section.
_DAY_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*|[-*+>][ \t]*|\d+[.)][ \t]*)?(?:\*\*|__)?[ \t]*day[ \t]+(\d{1,3})\b", re.I | re.M
)
_WORD = re.compile(r"[\w']+", re.UNICODE)

REPEATED_NGRAM = 4  # word n-gram size for the repetition check
MAX_REPEATED_NGRAM_RATE = 0.2  # above this share of repeated 4-grams an answer is degenerate (loops)
MIN_WORDS_PER_DAY = 25  # a day with fewer words than this is not a plan
MAX_WORDS_PER_DAY = 300  # nor is a day of more than this
MIN_WORDS, MAX_WORDS = 25, 1200  # bounds when the prompt gives no day count


@dataclass(frozen=True)
class TravelPrompt:
    """One line of a travel prompt file: `prompt` plus the structured fields the rubric needs."""

    prompt: str
    city: str | None = None
    days: int | None = None
    preferences: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    """A generated reply; `finished` is True when it ended with end-of-turn, False at the length limit, None if unknown."""

    text: str
    finished: bool | None = None


@dataclass
class Scored:
    score: float  # mean of the judged criteria, in [0, 1]
    criteria: dict[str, float | None] = field(default_factory=dict)  # None: not judged for this prompt


# ------------------------------------------------------------------------------------ criteria
def day_numbers(text: str) -> list[int]:
    """The N of every "Day N" section heading, in order of appearance."""
    return [int(n) for n in _DAY_HEADING.findall(text)]


def days_honoured(answer: Answer, prompt: TravelPrompt) -> float | None:
    """Exactly one "Day N" section for each requested day 1..days: no more, no fewer, none twice."""
    if prompt.days is None:
        return None
    return float(sorted(day_numbers(answer.text)) == list(range(1, prompt.days + 1)))


def city_named(answer: Answer, prompt: TravelPrompt) -> float | None:
    """The requested city is named in the answer (case-insensitive, whole words)."""
    if not prompt.city:
        return None
    return float(re.search(rf"\b{re.escape(prompt.city)}\b", answer.text, re.I) is not None)


def day_by_day_structure(answer: Answer, prompt: TravelPrompt) -> float | None:
    """The answer is organised in day sections that start at Day 1 and count up one by one."""
    days = day_numbers(answer.text)
    if not days:
        return 0.0
    return float(days == list(range(1, len(days) + 1)))


def preferences_mentioned(answer: Answer, prompt: TravelPrompt) -> float | None:
    """Share of the stated preferences (interests, constraints) the answer refers to."""
    if not prompt.preferences:
        return None
    words = {w.lower() for w in _WORD.findall(answer.text)}
    return sum(_mentions(preference, words) for preference in prompt.preferences) / len(prompt.preferences)


def _mentions(preference: str, answer_words: set[str]) -> bool:
    # One content word of the preference is enough. Words of 5+ letters match on their 5-letter stem
    # ("museums" ~ "museum", "beaches" ~ "beach"); shorter ones must match whole (plural allowed), so
    # "art" does not match "article".
    keys = [w.lower() for w in _WORD.findall(preference) if len(w) >= 3] or [preference.lower()]
    for key in keys:
        if len(key) >= 5 and any(word.startswith(key[:5]) for word in answer_words):
            return True
        if key in answer_words or f"{key}s" in answer_words:
            return True
    return False


def repeated_ngram_rate(text: str, n: int = REPEATED_NGRAM) -> float:
    """Share of word n-grams that already occurred earlier in the text (0: none repeated)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def no_degenerate_repetition(answer: Answer, prompt: TravelPrompt) -> float | None:
    """The answer does not loop: at most MAX_REPEATED_NGRAM_RATE of its word 4-grams are repeats."""
    return float(repeated_ngram_rate(answer.text) <= MAX_REPEATED_NGRAM_RATE)


def ended_with_end_of_turn(answer: Answer, prompt: TravelPrompt) -> float | None:
    """Generation stopped at the model's end-of-turn token, not at the length limit."""
    if answer.finished is None:
        return None
    return float(answer.finished)


def length_within_bounds(answer: Answer, prompt: TravelPrompt) -> float | None:
    """Word count within bounds that scale with the requested days (not a one-liner, not a runaway)."""
    words = len(_WORD.findall(answer.text))
    low, high = (
        (MIN_WORDS, MAX_WORDS)
        if prompt.days is None
        else (MIN_WORDS_PER_DAY * prompt.days, MAX_WORDS_PER_DAY * prompt.days)
    )
    return float(low <= words <= high)


CRITERIA = {
    "days_honoured": days_honoured,
    "city_named": city_named,
    "day_by_day": day_by_day_structure,
    "preferences": preferences_mentioned,
    "no_repetition": no_degenerate_repetition,
    "ended_cleanly": ended_with_end_of_turn,
    "length_ok": length_within_bounds,
}


def score_answer(answer: Answer, prompt: TravelPrompt) -> Scored:
    criteria = {name: check(answer, prompt) for name, check in CRITERIA.items()}
    judged = [value for value in criteria.values() if value is not None]
    return Scored(score=sum(judged) / len(judged) if judged else 0.0, criteria=criteria)


def compare(base: Scored, tuned: Scored) -> str:
    """ "win" when the tuned answer scores higher than the base answer, "loss" when lower, else "tie"."""
    if abs(tuned.score - base.score) < 1e-9:
        return "tie"
    return "win" if tuned.score > base.score else "loss"


# --------------------------------------------------------------------------------- prompt files
def load_travel_prompts(source: str | Path) -> list[TravelPrompt]:
    """`travel` (the shipped set) or a JSONL file: one {"prompt", optional "city", "days", "preferences"} per line.
    A frozen feedback regression set (`tunelab feedback export --format evalset`) reads as is: its header line
    `{"evalset": {...}}` is skipped."""
    path = SHIPPED_TRAVEL_PROMPTS if str(source) == "travel" else Path(source)
    if not path.is_file():
        raise UserError(f"--prompts {source}: file not found (give `travel` or a .jsonl file)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not _is_evalset_header(line):
            prompts.append(_prompt_from_record(line, f"{path}:{number}"))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _is_evalset_header(line: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "evalset" in record and "prompt" not in record


def _prompt_from_record(line: str, where: str) -> TravelPrompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise UserError(f"{where}: needs a non-empty string `prompt`")
    days, city, preferences = record.get("days"), record.get("city"), record.get("preferences") or []
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or days < 1):
        raise UserError(f"{where}: `days` must be a positive integer (got {days!r})")
    if city is not None and (not isinstance(city, str) or not city.strip()):
        raise UserError(f"{where}: `city` must be a non-empty string (got {city!r})")
    if not isinstance(preferences, list) or not all(isinstance(p, str) and p.strip() for p in preferences):
        raise UserError(f"{where}: `preferences` must be a list of strings")
    return TravelPrompt(prompt=record["prompt"], city=city, days=days, preferences=tuple(preferences))
