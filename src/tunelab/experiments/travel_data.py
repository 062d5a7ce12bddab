"""Travel training data for the quickstart's job: real itineraries selected from ShareGPT, and self-generated ones.

Two levers the study measures separately:
- `select_itineraries`: first exchanges of the embedded ShareGPT that ask for a trip of N days and answer with
  exactly N "Day n" sections, counting what each filter kept (they are few: real itineraries are scarce);
- `rejection_sample`: several sampled answers per synthetic travel prompt from the base model, the best one
  under the rubric kept as training data when it passes every judged criterion (the best-vs-worst pairs are
  written too, as preference pairs). Synthetic prompts never use a city of the shipped eval set.
Both write plain `{"messages": [...]}` JSONL files that a config lists as `data.sources: [{path: ...}]`. Neither
keeps a plan that names a big city far from the one asked about (`stays_in_city`), and `recheck_plans` puts a file of
plans made earlier through today's pass/fail checks.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

from tunelab.eval.rubric import (
    SHARE_CRITERIA,
    SHIPPED_TRAVEL_PROMPTS,
    Answer,
    TravelPrompt,
    day_by_day_structure,
    day_numbers,
    length_within_bounds,
    load_travel_prompts,
    no_degenerate_repetition,
    score_answer,
    stays_in_city,
)

TRIP_WORDS = re.compile(r"\b(?:travel|trip|itinerary|vacation|holiday|tour|visit|sightseeing|things to do in)\b", re.I)
_NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
_DAYS = re.compile(r"\b(\d{1,2}|one|two|three|four|five|six|seven|eight|nine|ten)[- ]?days?\b", re.I)


def requested_days(request: str) -> int | None:
    """The trip length a request asks for: "3 days", "a 5-day trip", "two days", "a week" (7), "weekend" (2)."""
    match = _DAYS.search(request)
    if match:
        word = match.group(1).lower()
        return int(word) if word.isdigit() else _NUMBER_WORDS[word]
    if re.search(r"\ba week\b|\bone week\b", request, re.I):
        return 7
    if re.search(r"\bweekend\b", request, re.I):
        return 2
    return None


def requested_city(request: str) -> str | None:
    """The first city a request names, by the gazetteer (None when it names none, e.g. a country)."""
    from tunelab.eval.gazetteer import city_mentions

    mentions = city_mentions(request)
    return mentions[0].name if mentions else None


# ------------------------------------------------------------------------- real itineraries
def sharegpt_first_exchanges() -> Iterator[tuple[str, str] | None]:
    """(user, assistant) of each embedded ShareGPT conversation's first exchange; None for unusable records."""
    from tunelab.data.formats import record_to_pairs
    from tunelab.data.normalize import to_messages
    from tunelab.data.problems import ProblemLog, RecordProblem
    from tunelab.data.readers import FileStats, ReadContext, embedded_files, iter_json

    for path, label in embedded_files("embedded:sharegpt"):
        ctx = ReadContext(
            label=label, source="sharegpt", log=ProblemLog(), max_chars=200_000, stats=FileStats(label=label)
        )
        for raw in iter_json(path, ctx):
            try:
                messages = to_messages(record_to_pairs(raw.value, "sharegpt"), normalize=True, repair=lambda _: None)
            except RecordProblem:
                yield None
                continue
            if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
                yield messages[0]["content"], messages[1]["content"]
            else:
                yield None


def select_itineraries(exchanges, max_request_chars: int = 1500) -> tuple[list[dict], Counter]:
    """Keep first exchanges that ask for an N-day trip and answer with exactly Day 1..N, staying in the city the
    request names (when it names one); count what each filter kept."""
    counts: Counter = Counter()
    kept, seen = [], set()
    for exchange in exchanges:
        counts["records"] += 1
        if exchange is None:
            continue
        user, assistant = exchange
        counts["user_then_assistant"] += 1
        if not TRIP_WORDS.search(user) or len(user) > max_request_chars:
            continue
        counts["asks_for_a_trip"] += 1
        days = requested_days(user)
        if days is None:
            continue
        counts["names_a_day_count"] += 1
        answer, prompt = Answer(assistant), TravelPrompt(prompt=user, days=days)
        if not day_by_day_structure(answer, prompt):
            continue
        counts["answers_day_by_day"] += 1
        if sorted(day_numbers(assistant)) != list(range(1, days + 1)):
            continue
        counts["honours_the_day_count"] += 1
        if not (length_within_bounds(answer, prompt) and no_degenerate_repetition(answer, prompt)):
            continue
        counts["length_ok_no_loops"] += 1
        city = requested_city(user)
        if city is not None and stays_in_city(answer, TravelPrompt(prompt=user, city=city)) == 0.0:
            continue
        counts["stays_in_city"] += 1
        key = " ".join(user.lower().split())
        if key in seen:
            continue
        seen.add(key)
        counts["after_exact_dedup"] += 1
        kept.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], "days": days}
        )
    return kept, counts


# ------------------------------------------------------------------------ self-generated data
# Cities for synthetic prompts, each with its ISO country code and 9-11 real, well-known places written from general
# knowledge (so rejection sampling can judge `names_real_places` too); none of them is in the shipped eval set
# (checked in synthetic_prompts).
SYNTHETIC_CITIES_FILE = Path(__file__).with_name("travel_cities.jsonl")


@cache
def synthetic_cities() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(city, country, places) of each line of `SYNTHETIC_CITIES_FILE`."""
    from tunelab.io import jsonl_records

    rows = [row for _, row in jsonl_records(SYNTHETIC_CITIES_FILE)]
    return tuple((row["city"], row["country"], tuple(row["places"])) for row in rows)


INTERESTS = [
    "food",
    "museums",
    "history",
    "art",
    "hiking",
    "beaches",
    "markets",
    "architecture",
    "music",
    "parks",
    "coffee",
    "nightlife",
    "photography",
    "local wine",
    "shopping",
]
CONSTRAINTS = [
    "",
    "",
    "",
    " with kids",
    " on a budget",
    " without a car",
    " for a wheelchair user",
    " in winter",
    " in summer",
]
# Phrased the many ways people ask (the shipped eval prompts are phrased freely too, and a model trained on one
# phrasing learns the plan format for that phrasing only). {n_days}: "3 days"; {word_days}: "Three days", "One day".
TEMPLATES = [
    "Plan a {days}-day trip to {city}{constraint} for someone who loves {a} and {b}.",
    "I have {n_days} in {city}{constraint}. I like {a} and {b}. Can you give me a day-by-day itinerary?",
    "Make a {days}-day itinerary for {city}{constraint}, focused on {a} and {b}.",
    "{word_days} in {city}{constraint}: I love {a} and {b}. What should I do each day?",
    "Give me a {days}-day {city} plan{constraint} with {a} and {b}.",
    "Plan {n_days} in {city}{constraint}, with {a} and some {b}.",
    "We have {n_days} in {city}{constraint} and we like {a} and {b}. Day by day, what should we do?",
    "What would you do with {n_days} in {city}{constraint}? I care most about {a}, then {b}.",
]
_WORDS = {1: "One day", 2: "Two days", 3: "Three days", 4: "Four days", 5: "Five days", 6: "Six days", 7: "Seven days"}


def synthetic_prompts(n: int, seed: int = 0, max_days: int = 4) -> list[TravelPrompt]:
    """`n` travel prompts (city x days x interests x constraint) that share no city with the shipped eval set."""
    eval_cities = {p.city.lower() for p in load_travel_prompts(SHIPPED_TRAVEL_PROMPTS) if p.city}
    cities = [c for c in synthetic_cities() if c[0].lower() not in eval_cities]
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        (city, country, places), days = cities[i % len(cities)], rng.randint(1, max_days)
        a, b = rng.sample(INTERESTS, 2)
        constraint = rng.choice(CONSTRAINTS)
        n_days = "1 day" if days == 1 else f"{days} days"
        text = rng.choice(TEMPLATES).format(
            days=days, n_days=n_days, word_days=_WORDS[days], city=city, constraint=constraint, a=a, b=b
        )
        preferences = (
            (a, b, constraint.strip().removeprefix("with ").removeprefix("on a ").removeprefix("for a "))
            if constraint
            else (a, b)
        )
        prompts.append(
            TravelPrompt(
                prompt=text,
                city=city,
                days=days,
                preferences=tuple(p for p in preferences if p),
                country=country,
                places=places,
            )
        )
    return prompts


def rejection_sample(
    prompts: list[TravelPrompt],
    sample: Callable[[TravelPrompt, int], Answer],
    samples_per_prompt: int,
    min_score: float = 1.0,
    log=print,
) -> tuple[list[dict], list[dict], Counter]:
    """Best of `samples_per_prompt` sampled answers per prompt under the rubric; kept when its score >= min_score
    and every pass/fail criterion it was judged on passed (a plan with the wrong city or a loop is never training
    data, whatever its mean; `preferences` is a share, so it only counts through the score).

    Preference pairs (DPO records: prompt, chosen, rejected) are the best vs the worst sample of a prompt whenever
    their scores differ, with the pass/fail checks each failed (`chosen_failed`, `rejected_failed`): the pairs
    whose chosen answer passes every check and whose rejected one fails some (wanders, loops, misses days) are
    the clean preferences, counted as `pairs_chosen_passes_rejected_fails`.

    `sample(prompt, seed)` returns one sampled answer. Returns (training rows, preference pairs, counts); the
    counts say how many prompts' best sample passed each pass/fail check in turn (`passes_<criterion>`), then the
    score threshold (`passes_min_score`, = `kept`).
    """
    kept, pairs, counts = [], [], Counter()
    for i, prompt in enumerate(prompts, 1):
        scored = []
        for seed in range(samples_per_prompt):
            answer = sample(prompt, seed)
            result = score_answer(answer, prompt)
            failed = any(value == 0.0 for name, value in result.criteria.items() if name not in SHARE_CRITERIA)
            scored.append((result.score, seed, answer, failed, result.criteria))
            counts["samples"] += 1
        scored.sort(key=lambda item: (item[3], -item[0], item[1]))  # passing every pass/fail check first, then by score
        best, worst = scored[0], scored[-1]
        counts["prompts"] += 1
        log(f"  [{i}/{len(prompts)}] best {best[0]:.2f} worst {worst[0]:.2f}  {prompt.prompt[:70]}")
        if best[0] > worst[0]:
            chosen_failed, rejected_failed = _failed_checks(best[4]), _failed_checks(worst[4])
            counts["pairs_chosen_passes_rejected_fails"] += not chosen_failed and bool(rejected_failed)
            pairs.append(
                {
                    "prompt": prompt.prompt,
                    "chosen": best[2].text,
                    "rejected": worst[2].text,
                    "chosen_score": best[0],
                    "rejected_score": worst[0],
                    "chosen_failed": chosen_failed,
                    "rejected_failed": rejected_failed,
                }
            )
        _count_filters(counts, best[4], best[0] >= min_score)
        if best[0] >= min_score and not best[3]:
            counts["kept"] += 1
            kept.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt.prompt},
                        {"role": "assistant", "content": best[2].text},
                    ],
                    "days": prompt.days,
                    "city": prompt.city,
                    "score": best[0],
                }
            )
    return kept, pairs, counts


def _failed_checks(criteria: dict[str, float | None]) -> list[str]:
    """The pass/fail checks an answer failed, e.g. ["stays_in_city", "no_repetition"]."""
    return [name for name, value in criteria.items() if name not in SHARE_CRITERIA and value == 0.0]


def _count_filters(counts: Counter, criteria: dict[str, float | None], above_min_score: bool | None) -> bool:
    """Count the pass/fail checks an answer passes, in CRITERIA order, up to the first it fails (a check that was
    not judged passes); then the score threshold when one is given. True when it passed them all."""
    for name, value in criteria.items():
        if name in SHARE_CRITERIA:
            continue
        if value == 0.0:
            return False
        counts[f"passes_{name}"] += 1
    if above_min_score is None:
        return True
    if above_min_score:
        counts["passes_min_score"] += 1
    return above_min_score


def recheck_plans(rows: list[dict]) -> tuple[list[dict], Counter]:
    """Plans made earlier ({"messages", "city", "days"} rows, e.g. embedded:travel-plans) put through today's
    pass/fail checks, whether generation ended cleanly aside (not recorded with them); what each check kept."""
    kept, counts = [], Counter()
    for row in rows:
        counts["plans"] += 1
        user, assistant = row["messages"][0]["content"], row["messages"][-1]["content"]
        prompt = TravelPrompt(prompt=user, city=row.get("city"), days=row.get("days"))
        if _count_filters(counts, score_answer(Answer(assistant), prompt).criteria, None):
            counts["kept"] += 1
            kept.append(row)
    return kept, counts


def gguf_sampler(
    gguf: Path,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 320,
    threads: int | None = None,
    day_grammar: bool = False,
    repetition_penalty: float = 1.1,
):
    """sample(prompt, seed) from a GGUF in llama.cpp (e.g. the embedded base model), through the app's backend.

    day_grammar: constrain each sample to the prompt's number of "Day n" sections (`eval.plan_grammar`); the
    small base model almost never writes a correctly sized plan on its own, so without it rejection sampling
    keeps next to nothing. The token budget is then the grammar's longest plan (it is never cut).
    """
    from tunelab.errors import UserError
    from tunelab.eval.domain import answer_in_llama_cpp
    from tunelab.models.inference import load_backend

    if Path(gguf).suffix != ".gguf":  # a run or HF folder would load in transformers, which cannot sample here
        raise UserError(f"--model {gguf}: not a .gguf file (llama.cpp samples the answers)")
    llm = load_backend(gguf, threads=threads).llm

    def sample(prompt: TravelPrompt, seed: int) -> Answer:
        return answer_in_llama_cpp(llm, prompt, day_grammar, max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed, repeat_penalty=repetition_penalty)  # fmt: skip

    return sample
