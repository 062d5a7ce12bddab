"""The travel rubric on hand-written good and bad answers: each criterion can pass and can fail."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import UserError
from tunelab.eval.gazetteer import fold
from tunelab.eval.rubric import (
    CRITERIA,
    SHIPPED_TRAVEL_PROMPTS,
    Answer,
    TravelPrompt,
    city_named,
    compare,
    day_by_day_structure,
    day_numbers,
    days_honoured,
    ended_with_end_of_turn,
    length_within_bounds,
    load_travel_prompts,
    named_places,
    names_real_places,
    no_degenerate_repetition,
    preferences_mentioned,
    repeated_ngram_rate,
    score_answer,
    stays_in_city,
)

LISBON = TravelPrompt(
    prompt="Plan a 2-day trip to Lisbon for someone who loves food and museums.",
    city="Lisbon",
    days=2,
    preferences=("food", "museums"),
)

GOOD = """Here is a two-day plan for Lisbon.

**Day 1: Alfama and Baixa**
Start at the Sé cathedral, walk up to São Jorge castle for the view, then lunch on grilled sardines in Alfama.
In the afternoon visit the National Tile Museum and end with a fado dinner.

**Day 2: Belém**
Take tram 15 to Belém: the Jerónimos monastery, the MAAT museum and pastéis de nata at the old bakery.
Finish with seafood at the Time Out market, the best place to taste Portuguese food in one hall.
"""

# What the issue saw from the tuned quickstart model: weekday sections, looping, and too many days.
WEEKDAYS = """Monday: visit the castle and the old town of Lisbon.
Tuesday: visit the castle and the old town of Lisbon.
"""
LOOPING = "\n".join(f"Day {n}: visit the castle and eat at the market." for n in range(1, 23))
PORTO = """Day 1
Walk along the Ribeira and cross the bridge, then taste port wine in the cellars of the river bank.
Day 2
Visit the Livraria Lello bookshop, the São Bento station tiles and a food market for a local lunch.
"""


def test_day_numbers_reads_section_headings_only():
    text = (
        "## Day 1\nOn day 3 of your trip you will be tired.\n- Day 2 - beach\n"
        "**Day 3:** museums\n1. Day 4\nday 5 morning"
    )
    assert day_numbers(text) == [1, 2, 3, 4, 5]
    assert day_numbers("You could spend a day 2 hours away.") == []


def test_days_honoured_needs_exactly_one_section_per_requested_day():
    assert days_honoured(Answer(GOOD), LISBON) == 1.0
    assert days_honoured(Answer(LOOPING), LISBON) == 0.0  # 22 days for a 2-day trip
    assert days_honoured(Answer(WEEKDAYS), LISBON) == 0.0  # no Day sections
    assert days_honoured(Answer("Day 1: castle.\nDay 1: market."), LISBON) == 0.0  # Day 1 twice, no Day 2
    assert days_honoured(Answer("Day 1: castle."), LISBON) == 0.0  # one day short
    assert days_honoured(Answer(GOOD), TravelPrompt(prompt="Plan Lisbon", city="Lisbon")) is None


def test_city_named_whole_word_case_insensitive():
    assert city_named(Answer(GOOD), LISBON) == 1.0
    assert city_named(Answer(PORTO), LISBON) == 0.0
    assert city_named(Answer("LISBON is lovely"), LISBON) == 1.0
    assert city_named(Answer("Rome"), TravelPrompt(prompt="x", city="Rome")) == 1.0
    assert city_named(Answer("Romeo and Juliet"), TravelPrompt(prompt="x", city="Rome")) == 0.0
    assert city_named(Answer(GOOD), TravelPrompt(prompt="x")) is None


def test_day_by_day_structure_starts_at_one_and_counts_up():
    assert day_by_day_structure(Answer(GOOD), LISBON) == 1.0
    assert day_by_day_structure(Answer(WEEKDAYS), LISBON) == 0.0
    assert day_by_day_structure(Answer("Day 2: a\nDay 1: b"), LISBON) == 0.0
    assert day_by_day_structure(Answer("Day 1: a\nDay 3: b"), LISBON) == 0.0
    assert day_by_day_structure(Answer(LOOPING), LISBON) == 1.0  # structured, though wrong length (days_honoured fails)


def test_preferences_mentioned_is_the_share_of_preferences_referred_to():
    assert preferences_mentioned(Answer(GOOD), LISBON) == 1.0
    assert preferences_mentioned(Answer("Day 1: a museum. Day 2: the beach."), LISBON) == 0.5  # museum ~ museums
    assert preferences_mentioned(Answer(PORTO), LISBON) == 0.5  # food market, no museum
    assert (
        preferences_mentioned(Answer("An article about parks."), TravelPrompt(prompt="x", preferences=("art",))) == 0.0
    )
    assert (
        preferences_mentioned(Answer("Street art everywhere."), TravelPrompt(prompt="x", preferences=("street art",)))
        == 1.0
    )
    assert preferences_mentioned(Answer(GOOD), TravelPrompt(prompt="x")) is None


def test_repetition_rate_against_a_hand_count():
    # 6 words -> 3 four-grams: (a b c d), (b c d a), (c d a b): all distinct.
    assert repeated_ngram_rate("a b c d a b") == 0.0
    # 8 words "a b c d a b c d" -> 5 four-grams, 4 distinct -> 1 repeat of 5.
    assert repeated_ngram_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert no_degenerate_repetition(Answer(GOOD), LISBON) == 1.0
    assert no_degenerate_repetition(Answer(LOOPING), LISBON) == 0.0
    assert no_degenerate_repetition(Answer(WEEKDAYS), LISBON) == 0.0


def test_ended_with_end_of_turn_and_length_bounds():
    assert ended_with_end_of_turn(Answer(GOOD, finished=True), LISBON) == 1.0
    assert ended_with_end_of_turn(Answer(GOOD, finished=False), LISBON) == 0.0
    assert ended_with_end_of_turn(Answer(GOOD), LISBON) is None
    assert length_within_bounds(Answer(GOOD), LISBON) == 1.0
    assert length_within_bounds(Answer("Day 1: castle. Day 2: museum."), LISBON) == 0.0  # too short for 2 days
    assert length_within_bounds(Answer("word " * 700), LISBON) == 0.0  # over 300 words a day
    assert length_within_bounds(Answer("word " * 700), TravelPrompt(prompt="x")) == 1.0  # no day count: wide bounds


def test_score_is_the_mean_of_judged_criteria_and_good_beats_bad():
    good = score_answer(Answer(GOOD, finished=True), LISBON)
    assert good.score == 1.0 and set(good.criteria) == set(CRITERIA)
    for bad_text in (WEEKDAYS, LOOPING, PORTO):
        bad = score_answer(Answer(bad_text, finished=False), LISBON)
        assert bad.score < good.score
        assert compare(bad, good) == "win" and compare(good, bad) == "loss" and compare(bad, bad) == "tie"
    # PORTO: days ok, city no, day-by-day ok, preferences 1/2, no repetition ok, ended no, 41 words < 2 x 25, and
    # stays in Lisbon (Porto has fewer than 300k people); no places listed: names_real_places not judged -> 4.5 / 8.
    assert score_answer(Answer(PORTO, finished=False), LISBON).score == pytest.approx(4.5 / 8)
    # Without city/days/preferences/places/finished, only day_by_day, no_repetition and length_ok are judged.
    bare = score_answer(Answer(GOOD), TravelPrompt(prompt="Plan something"))
    assert [k for k, v in bare.criteria.items() if v is not None] == ["day_by_day", "no_repetition", "length_ok"]


def test_shipped_prompt_set_is_varied():
    prompts = load_travel_prompts("travel")
    assert len(prompts) >= 40
    assert all(p.city and p.days for p in prompts)
    assert {p.days for p in prompts} == set(range(1, 8))
    records = [json.loads(line) for line in SHIPPED_TRAVEL_PROMPTS.read_text().splitlines()]
    assert {r["continent"] for r in records} >= {
        "Europe",
        "Asia",
        "Africa",
        "North America",
        "South America",
        "Oceania",
    }
    constraints = " ".join(p.prompt.lower() for p in prompts)
    for word in ("kids", "without a car", "wheelchair", "budget", "winter", "summer"):
        assert word in constraints, word
    assert len({p.prompt for p in prompts}) == len(prompts)


def test_prompt_files_with_optional_fields_and_bad_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Plan Oslo", "city": "Oslo"}\n\n{"prompt": "Anything"}\n')
    assert load_travel_prompts(path) == [TravelPrompt("Plan Oslo", city="Oslo"), TravelPrompt("Anything")]
    for bad, message in (
        ('{"city": "Oslo"}', "p.jsonl:1: needs a non-empty string `prompt`"),
        ('{"prompt": "x", "days": 0}', "p.jsonl:1: `days` must be a positive integer"),
        ('{"prompt": "x", "preferences": 3}', "p.jsonl:1: `preferences` must be a list of strings or one comma"),
        ('{"prompt": "x", "places": "Ribeira"}', "p.jsonl:1: `places` must be a list of strings"),
        ('{"prompt": "x", "country": "Portugal"}', "p.jsonl:1: `country` must be a two-letter ISO 3166 code"),
        ("not json", "p.jsonl:1: not valid JSON"),
    ):
        path.write_text(bad + "\n")
        with pytest.raises(UserError, match=message):
            load_travel_prompts(path)
    with pytest.raises(UserError, match="file not found"):
        load_travel_prompts(tmp_path / "missing.jsonl")


def test_preferences_as_one_comma_separated_string_and_places(tmp_path):
    path = tmp_path / "p.jsonl"
    record = {"prompt": "Porto?", "city": "Porto", "country": "pt", "places": ["Ribeira", "Livraria Lello"],
              "preferences": "wine and river views, moderate budget"}  # fmt: skip
    path.write_text(json.dumps(record) + "\n")
    assert load_travel_prompts(path) == [
        TravelPrompt("Porto?", city="Porto", preferences=("wine and river views", "moderate budget"), country="PT",
                     places=("Ribeira", "Livraria Lello"))
    ]  # fmt: skip


PORTO_PROMPT = TravelPrompt(
    prompt="Plan 2 days in Porto for wine lovers.",
    city="Porto",
    days=2,
    preferences=("wine",),
    places=("Ribeira", "Livraria Lello", "São Bento Station", "Dom Luís I Bridge", "Clérigos Tower"),
)
# The first shipped Porto training plan, as the issue quotes it: set in Mumbai, with Diwali.
PORTO_IN_MUMBAI = """Day 1: Arrival and Day 3 (Mumbai, India)
- I arrive in Mumbai (the capital of India) at around 09:45.
- I head to the city's famous market Market India which is a global hub for food and culture.
Day 2: Porto wine and the festival of Diwali (the Festival of Lights) with dinner with my family.
"""


def test_stays_in_city_fails_a_porto_plan_set_in_mumbai():
    assert stays_in_city(Answer(PORTO), PORTO_PROMPT) == 1.0
    assert stays_in_city(Answer(PORTO_IN_MUMBAI), PORTO_PROMPT) == 0.0  # Mumbai: 12.7M people, ~7,900 km away
    assert stays_in_city(Answer("Day 1: Porto, then the train to Lisbon."), PORTO_PROMPT) == 0.0  # 274 km
    # Near big cities and small far towns pass: Vila Nova de Gaia is across the river; Braga has < 300k people.
    assert stays_in_city(Answer("Cross to Vila Nova de Gaia, then a day trip to Braga."), PORTO_PROMPT) == 1.0
    assert stays_in_city(Answer(PORTO), TravelPrompt(prompt="x")) is None  # no city
    assert (
        stays_in_city(Answer(PORTO), TravelPrompt(prompt="x", city="Xanadu-upon-Nowhere")) is None
    )  # not in the gazetteer


def test_stays_in_city_reads_ambiguous_and_borrowed_names_sensibly():
    valencia = TravelPrompt(prompt="x", city="Valencia")  # Spain's and Venezuela's: near either is near
    assert stays_in_city(Answer("Paella in Valencia, then the beach."), valencia) == 1.0
    assert stays_in_city(Answer("A day trip to Madrid."), valencia) == 0.0  # far from both Valencias
    spain = TravelPrompt(prompt="x", city="Valencia", country="ES")
    assert stays_in_city(Answer("Then on to Caracas."), spain) == 0.0  # 160 km from Venezuela's Valencia only
    assert stays_in_city(Answer("Then on to Caracas."), valencia) == 1.0
    edinburgh = TravelPrompt(prompt="x", city="Edinburgh", country="GB")
    assert stays_in_city(Answer("A day trip to Perth."), edinburgh) == 1.0  # Scotland's Perth, not Australia's
    assert stays_in_city(Answer("Córdoba for the Mezquita."), TravelPrompt(prompt="x", city="Seville")) == 1.0
    new_york = TravelPrompt(prompt="x", city="New York", country="US")
    assert stays_in_city(Answer("Washington Square Park, then Lexington Avenue."), new_york) == 1.0  # street names
    assert stays_in_city(Answer("Brooklyn and Queens by subway."), new_york) == 1.0  # boroughs, near
    assert stays_in_city(Answer("Take the train to Boston."), new_york) == 0.0
    amsterdam = TravelPrompt(prompt="x", city="Amsterdam")
    assert stays_in_city(Answer("The Van Gogh Museum; a nice walk."), amsterdam) == 1.0  # not Van, Turkey
    buenos_aires = TravelPrompt(prompt="x", city="Buenos Aires", country="AR", places=("Palermo", "San Telmo"))
    assert stays_in_city(Answer("Dinner in Palermo."), buenos_aires) == 1.0  # a listed place, not Sicily's city
    assert stays_in_city(Answer("Dinner in Palermo."), TravelPrompt(prompt="x", city="Buenos Aires")) == 0.0
    boston = TravelPrompt(prompt="x", city="Boston", country="US")
    assert stays_in_city(Answer("A day in New York."), boston) == 0.0  # "New York City" written as "New York"


def test_names_real_places_is_the_share_of_named_places_that_are_listed():
    # PORTO names Ribeira, "the Livraria Lello bookshop" and "the São Bento station" (listed as "São Bento
    # Station"): 3 named places, all real.
    assert [fold(PORTO)[a:b] for a, b, _ in named_places(PORTO, PORTO_PROMPT.places)] == [
        "Ribeira", "Visit the Livraria Lello bookshop", "Sao Bento station"
    ]  # fmt: skip
    assert names_real_places(Answer(PORTO), PORTO_PROMPT) == 1.0
    # + an invented "Grand Shibbere Market" and far-away Mumbai: 3 real of 5 named.
    wandering = PORTO + "Day 3: the Grand Shibbere Market, then a flight to Mumbai."
    assert names_real_places(Answer(wandering), PORTO_PROMPT) == pytest.approx(3 / 5)
    # "Market India" (invented) and Mumbai named, nothing real: 0 of 2.
    assert names_real_places(Answer(PORTO_IN_MUMBAI), PORTO_PROMPT) == 0.0
    # Generic phrases name no particular place; an answer that names none scores 0.
    assert named_places("Visit the National Museum and the old market.", ()) == []
    assert names_real_places(Answer("Enjoy the city and its food."), PORTO_PROMPT) == 0.0
    assert names_real_places(Answer(PORTO), LISBON) is None  # no places listed


def test_shipped_prompts_list_real_places_of_their_city():
    for prompt in load_travel_prompts("travel"):
        assert 5 <= len(prompt.places) <= 10, prompt.city
        assert len(set(prompt.places)) == len(prompt.places), prompt.city
        assert prompt.country and len(prompt.country) == 2, prompt.city
