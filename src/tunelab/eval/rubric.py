"""An automatic rubric for travel-planning answers: one named function per criterion, a score per answer.

    prompt = TravelPrompt(prompt="Plan 2 days in Lisbon ...", city="Lisbon", days=2, preferences=["food"])
    result = score_answer(Answer(text=reply, finished=True), prompt)
    result.score, result.criteria["days_honoured"]

Each criterion returns a score in [0, 1], or None when it cannot be judged (the prompt has no `city` / `days` /
`preferences` / `places`, the city is not in the gazetteer, or it is unknown whether generation stopped at
end-of-turn); the answer's score is the mean of the criteria that could be judged. Most criteria check form (the
plan the user asked for). Two see content, through an offline gazetteer (eval/gazetteer.py) and the prompt file:
`stays_in_city` (no big city far from the requested one is named: a Porto plan set in Mumbai fails) and
`names_real_places` (the share of the places the answer names that are among the prompt's known real places).
Neither checks that what is said about a place is true; that is what a judge model or a person is for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tunelab.errors import UserError
from tunelab.eval.gazetteer import far_cities, fold, locate
from tunelab.eval.stats import outcome
from tunelab.io import jsonl_records

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
    country: str | None = None  # ISO 3166 code of `city`: picks the right one of several cities of that name
    places: tuple[str, ...] = ()  # real, well-known places of `city` ("Ribeira", "Livraria Lello")


@dataclass(frozen=True)
class Answer:
    """A generated reply; `finished` is True when it ended with end-of-turn, False at the length limit,
    None if unknown."""

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


def stays_in_city(answer: Answer, prompt: TravelPrompt) -> float | None:
    """No city of gazetteer.BIG_CITY_POPULATION or more people farther than gazetteer.NEARBY_KM from the requested
    city is named; None when the prompt has no city or the gazetteer does not know it. A listed place of the city
    is never a far city (Buenos Aires' Palermo is not Sicily's)."""
    if not prompt.city:
        return None
    near = locate(prompt.city, prompt.country)
    if not near:
        return None
    return float(not _far_cities_not_listed(answer.text, near, prompt.places))


def _far_cities_not_listed(text: str, near, places: tuple[str, ...]) -> list[tuple[int, int]]:
    folded = fold(text)
    listed = [(m.start(), m.end()) for place in places for m in _place_pattern(place).finditer(folded)]
    return [
        (m.start, m.end)
        for m in far_cities(text, near)
        if not any(start < m.end and m.start < end for start, end in listed)
    ]


# A named place is a capitalised phrase around one of these words ("Jerónimos Monastery", "Praça do Comércio",
# "Bolhão market"), a listed place of the prompt, or a far city.
PLACE_WORDS = frozenset(
    """museum museu museo musée musee gallery galleria palace palácio palacio palazzo palais castle castelo castillo
    castello fort fortress citadel cathedral catedral cattedrale duomo church igreja iglesia chiesa basilica basílica
    chapel abbey monastery mosteiro monasterio convent temple shrine mosque pagoda synagogue market mercado mercato
    marché marche bazaar souk park parque parco garden gardens jardim jardín jardin square praça praca plaza piazza
    platz street rua calle avenue avenida boulevard bridge ponte puente pont tower torre gate station estação
    beach praia playa bay island hill mount mountain peak lake harbour harbor pier wharf quay canal falls tomb
    mausoleum memorial monument library theatre theater opera zoo aquarium stadium viewpoint miradouro mirador
    quarter district bookshop bookstore""".split()
)
# Capitalised words that start a sentence or describe rather than name: "Visit Museum" and "National Museum"
# name no particular place.
GENERIC_WORDS = frozenset(
    """a an the and or of in at on to from for with near next then after before day morning afternoon evening night
    visit explore see head walk take start begin enjoy stop go spend end finish lunch dinner breakfast tour return
    relax stroll wander discover admire climb hike ride have try grab eat drink shop browse catch watch book option
    optional tip free your our my this that there here its local old new main central city national royal grand
    great modern contemporary historic ancient art arts history natural science public botanical botanic municipal
    little big upper lower north south east west famous beautiful best top""".split()
)
CONNECTORS = frozenset("de da do dos das del della di du des la le el of the y e van von der den al".split())
_PHRASE_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


def named_places(text: str, places: tuple[str, ...] = ()) -> list[tuple[int, int, bool]]:
    """(start, end, real) of every place the text names: its listed `places` (real), capitalised phrases around a
    PLACE_WORDS word that overlap no listed place (not real), and far cities (not real). Overlapping spans merge
    into one place, real when any part of it is a listed place."""
    folded = fold(text)
    spans = [(m.start(), m.end(), True) for place in places for m in _place_pattern(place).finditer(folded)]
    tokens = list(_PHRASE_TOKEN.finditer(folded))
    for i, token in enumerate(tokens):
        if token.group().casefold() not in PLACE_WORDS:
            continue
        first = last = i
        while first > 0 and _joins(tokens[first - 1], tokens, first - 1, folded):
            first -= 1
        while last + 1 < len(tokens) and _joins(tokens[last + 1], tokens, last + 1, folded, rightwards=True):
            last += 1
        words = [t.group() for t in tokens[first : last + 1]]
        if any(w[0].isupper() and w.casefold() not in PLACE_WORDS | GENERIC_WORDS for w in words):
            spans.append((tokens[first].start(), tokens[last].end(), False))
    return _merge(spans)


def _joins(token: re.Match, tokens: list[re.Match], i: int, text: str, rightwards: bool = False) -> bool:
    """Whether a neighbouring word belongs to the place phrase: a capitalised word on the same line, or a
    connector ("de", "of") with a capitalised word beyond it."""
    neighbour = tokens[i + 1] if not rightwards else tokens[i - 1]
    gap = text[min(token.end(), neighbour.end()) : max(token.start(), neighbour.start())]
    if gap.strip(" '’-") or "\n" in gap:
        return False  # punctuation or a line break ends a name
    word = token.group()
    if word[0].isupper():
        return True
    if word.casefold() in CONNECTORS:
        beyond = i - 1 if not rightwards else i + 1
        return 0 <= beyond < len(tokens) and tokens[beyond].group()[0].isupper()
    return False


@lru_cache(maxsize=4096)
def _place_pattern(place: str) -> re.Pattern:
    words = _PHRASE_TOKEN.findall(fold(place))
    return re.compile(r"(?<!\w)" + r"[\s'’.-]+".join(map(re.escape, words)) + r"(?!\w)", re.I)


def _merge(spans: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    merged: list[tuple[int, int, bool]] = []
    for start, end, real in sorted(spans):
        if merged and start < merged[-1][1]:
            last_start, last_end, last_real = merged[-1]
            merged[-1] = (last_start, max(end, last_end), last_real or real)
        else:
            merged.append((start, end, real))
    return merged


def names_real_places(answer: Answer, prompt: TravelPrompt) -> float | None:
    """Share of the places the answer names that are listed real places of the city (0 when it names none);
    None without a `places` list."""
    if not prompt.places:
        return None
    spans = named_places(answer.text, prompt.places)
    near = locate(prompt.city, prompt.country) if prompt.city else ()
    if near:
        spans = _merge(
            spans + [(start, end, False) for start, end in _far_cities_not_listed(answer.text, near, prompt.places)]
        )
    return sum(real for _, _, real in spans) / len(spans) if spans else 0.0


CRITERIA = {
    "days_honoured": days_honoured,
    "city_named": city_named,
    "day_by_day": day_by_day_structure,
    "preferences": preferences_mentioned,
    "no_repetition": no_degenerate_repetition,
    "ended_cleanly": ended_with_end_of_turn,
    "length_ok": length_within_bounds,
    "stays_in_city": stays_in_city,
    "names_real_places": names_real_places,
}
# Criteria that are a share, not pass/fail: a low value does not by itself disqualify an answer.
SHARE_CRITERIA = frozenset({"preferences", "names_real_places"})


def score_answer(answer: Answer, prompt: TravelPrompt) -> Scored:
    criteria = {name: check(answer, prompt) for name, check in CRITERIA.items()}
    judged = [value for value in criteria.values() if value is not None]
    return Scored(score=sum(judged) / len(judged) if judged else 0.0, criteria=criteria)


def compare(base: Scored, tuned: Scored) -> str:
    """ "win" when the tuned answer scores higher than the base answer, "loss" when lower, else "tie"."""
    return outcome(base.score, tuned.score)


# --------------------------------------------------------------------------------- prompt files
def load_travel_prompts(source: str | Path) -> list[TravelPrompt]:
    """`travel` (the shipped set) or a JSONL file: one {"prompt", optional "city", "days", "preferences", "country",
    "places"} per line (`preferences` a list or one comma-separated string, `places` a list).
    A frozen feedback regression set (`tunelab feedback export --format evalset`) reads as is: its header line
    `{"evalset": {...}}` is skipped."""
    path = SHIPPED_TRAVEL_PROMPTS if str(source) == "travel" else Path(source)
    if not path.is_file():
        raise UserError(f"--prompts {source}: file not found (give `travel` or a .jsonl file)")
    prompts = [
        _prompt_from_record(record, where) for where, record in jsonl_records(path) if not is_evalset_header(record)
    ]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def is_evalset_header(record: dict) -> bool:
    """A frozen regression set's first line (`{"evalset": {"version": ...}}`, serve/evalset.write_evalset): the set's
    description, not a prompt."""
    return "evalset" in record and "prompt" not in record


def _prompt_from_record(record: dict, where: str) -> TravelPrompt:
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise UserError(f"{where}: needs a non-empty string `prompt`")
    days, city, country = record.get("days"), record.get("city"), record.get("country")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or days < 1):
        raise UserError(f"{where}: `days` must be a positive integer (got {days!r})")
    if city is not None and (not isinstance(city, str) or not city.strip()):
        raise UserError(f"{where}: `city` must be a non-empty string (got {city!r})")
    if country is not None and (not isinstance(country, str) or not re.fullmatch(r"[A-Za-z]{2}", country)):
        raise UserError(f"{where}: `country` must be a two-letter ISO 3166 code such as PT (got {country!r})")
    return TravelPrompt(
        prompt=record["prompt"],
        city=city,
        days=days,
        preferences=_string_list(record.get("preferences"), "preferences", where, comma_separated=True),
        country=country.upper() if country else None,
        places=_string_list(record.get("places"), "places", where),
    )


def _string_list(value, key: str, where: str, comma_separated: bool = False) -> tuple[str, ...]:
    """A list of non-empty strings; with `comma_separated`, also one string of comma-separated items."""
    if value is None:
        return ()
    if comma_separated and isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        form = "a list of strings or one comma-separated string" if comma_separated else "a list of strings"
        raise UserError(f"{where}: `{key}` must be {form}")
    return tuple(item.strip() for item in value)
