"""Travel data levers: selecting real itineraries, synthetic prompts, rejection sampling under the rubric."""

from __future__ import annotations

from tunelab.eval.rubric import Answer, TravelPrompt, load_travel_prompts, score_answer
from tunelab.experiments.travel_data import (
    recheck_plans,
    rejection_sample,
    requested_city,
    requested_days,
    select_itineraries,
    synthetic_cities,
    synthetic_prompts,
)

TWO_DAYS = (
    "Day 1: the castle and the old town in the morning, then lunch by the river, a long walk through the markets "
    "and the cathedral, and a sunset from the viewpoint above the harbour.\n"
    "Day 2: a morning at the main museum, the botanical garden after lunch, "
    "a tram ride along the coast to the old fort, "
    "and dinner at a seafood place near the station."
)


def test_requested_days_reads_counts_words_weeks_and_weekends():
    assert requested_days("Plan a 3-day trip to Rome") == 3
    assert requested_days("I have two days in Paris") == 2
    assert requested_days("a 10 day itinerary for Japan") == 10
    assert requested_days("We have a week in Bali") == 7
    assert requested_days("a weekend in Prague") == 2
    assert requested_days("Things to do in Oslo?") is None


def test_select_itineraries_counts_every_filter():
    exchanges = [
        None,  # unusable record
        ("What is the capital of France?", "Paris."),  # not a trip
        ("Plan a trip to Rome.", TWO_DAYS),  # no day count
        ("Plan a 2-day trip to Lisbon.", "Visit the castle, then the museum and the river."),  # not day by day
        ("Plan a 3-day trip to Lisbon.", TWO_DAYS),  # 2 days for 3
        ("Plan a 2-day trip to Lisbon.", "Day 1: go.\nDay 2: go."),  # too short
        ("Plan a 2-day trip to Lisbon.", TWO_DAYS.replace("the main museum", "the main museum in Madrid")),  # 500 km
        ("Plan a 2-day trip to Lisbon.", TWO_DAYS),  # kept
        ("Plan a 2-day  trip to Lisbon.", TWO_DAYS),  # the same request again (whitespace aside)
    ]
    kept, counts = select_itineraries(exchanges)
    assert [row["days"] for row in kept] == [2]
    assert kept[0]["messages"][1]["content"] == TWO_DAYS
    assert dict(counts) == {
        "records": 9,
        "user_then_assistant": 8,
        "asks_for_a_trip": 7,
        "names_a_day_count": 6,
        "answers_day_by_day": 5,
        "honours_the_day_count": 4,
        "length_ok_no_loops": 3,
        "stays_in_city": 2,
        "after_exact_dedup": 1,
    }


def test_requested_city_is_the_first_city_a_request_names():
    assert requested_city("Plan a 3-day trip to Lisbon and Porto") == "Lisbon"
    assert requested_city("A week in Japan, please") is None  # a country, not a city
    assert requested_city("Two weeks in Asia") is None  # a continent (and a town in Peru)


def test_recheck_plans_drops_wandering_plans_and_counts_each_check():
    def row(city: str, text: str) -> dict:
        messages = [
            {"role": "user", "content": f"Plan a 2-day trip to {city}."},
            {"role": "assistant", "content": text},
        ]
        return {"messages": messages, "city": city, "days": 2}

    in_lisbon = row("Lisbon", "Lisbon in two days.\n" + TWO_DAYS)
    in_mumbai = row("Lisbon", "Lisbon, or rather Mumbai.\n" + TWO_DAYS)
    one_day = row("Lisbon", "Lisbon.\n" + TWO_DAYS.split("\n")[0])
    kept, counts = recheck_plans([in_lisbon, in_mumbai, one_day])
    assert kept == [in_lisbon]
    assert counts["plans"] == 3 and counts["kept"] == 1
    assert counts["passes_days_honoured"] == 2  # the one-day plan stops at the first check
    assert counts["passes_length_ok"] == 2 and counts["passes_stays_in_city"] == 1


def test_synthetic_prompts_never_use_an_eval_city_or_prompt():
    prompts = synthetic_prompts(80, seed=1)
    shipped = load_travel_prompts("travel")
    assert not {p.city for p in prompts} & {p.city for p in shipped}
    assert not {p.prompt for p in prompts} & {p.prompt for p in shipped}
    assert all(
        requested_days(p.prompt) == p.days and p.city in p.prompt for p in prompts
    )  # "3 days", "Three days", "3-day"
    assert synthetic_prompts(80, seed=1) == prompts  # deterministic


def test_synthetic_prompts_carry_their_citys_country_and_places_and_the_rubric_reads_them():
    prompts = synthetic_prompts(80, seed=1)
    assert all(p.country and len(p.places) >= 9 for p in prompts)
    for city, country, places in synthetic_cities():
        # A plan naming only the city's listed places is all real and in the city: no listed place reads as a
        # far city ("Mount Wellington" in Hobart) or as an invented one, and the gazetteer knows the city.
        prompt = TravelPrompt(prompt=f"One day in {city}", city=city, days=1, country=country, places=places)
        plan = f"Day 1: {city}\n" + "\n".join(f"- See {place} in {city}." for place in places)
        criteria = score_answer(Answer(plan, True), prompt).criteria
        assert (criteria["names_real_places"], criteria["stays_in_city"]) == (1.0, 1.0), city
        wandering = score_answer(Answer(plan + "\n- Fly to Madrid and Tokyo.", True), prompt).criteria
        assert wandering["stays_in_city"] == 0.0 and wandering["names_real_places"] < 1.0, city


def test_rejection_sampling_keeps_the_best_sample_that_passes():
    prompts = synthetic_prompts(3, seed=0)

    def sample(prompt: TravelPrompt, seed: int) -> Answer:
        # Seed 2 writes a complete plan for the first prompt only; every other sample is a one-liner.
        target = prompts[0]
        if prompt == target and seed == 2:
            plans = [
                "the old town, the cathedral and a long lunch on the main square, then photos of the bridges at dusk",
                "a river cruise in the morning, the modern art quarter after lunch and live music at night",
                "a day trip to the coast with a picnic, a swim if it is warm and seafood back in town",
                "the covered market for breakfast, a cooking class at noon and a farewell dinner uphill",
            ]
            days = f"A plan for {target.city}, full of {' and '.join(target.preferences)}.\n" + "\n".join(
                f"Day {d}: {plans[d - 1]}, and {target.places[d - 1]}; keep the afternoon {d} free for whatever you"
                " liked best so far."
                for d in range(1, target.days + 1)
            )
            return Answer(days, finished=True)
        return Answer("Have fun!", finished=seed % 2 == 0)

    rows, pairs, counts = rejection_sample(prompts, sample, samples_per_prompt=3, log=lambda *_: None)
    assert counts["samples"] == 9 and counts["prompts"] == 3 and counts["kept"] == 1
    # "Have fun!" has no Day sections: prompts 2 and 3 stop at the first check; prompt 1's plan passes them all.
    assert counts["passes_days_honoured"] == 1 and counts["passes_stays_in_city"] == counts["passes_min_score"] == 1
    assert rows[0]["messages"][0]["content"] == prompts[0].prompt and rows[0]["score"] == 1.0
    assert "\nDay 1: " in pairs[0]["chosen"] and pairs[0]["rejected"] == "Have fun!"
    assert pairs[0]["chosen_failed"] == [] and "days_honoured" in pairs[0]["rejected_failed"]
    assert counts["pairs_chosen_passes_rejected_fails"] == 1  # prompts 2 and 3: both sides fail checks
    # Prompts 2 and 3: "Have fun!" ending at end-of-turn (seeds 0, 2) beats the same text cut at the length limit.
    assert len(pairs) == 3 and all(p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_a_sample_failing_a_pass_fail_check_is_never_kept_whatever_its_score():
    prompt = TravelPrompt(prompt="Plan a 2-day trip to Porto for someone who loves food and art.", city="Porto", days=2,
                          preferences=("food", "art"))  # fmt: skip
    body = (
        "Day 1: the old town and its food markets in the morning, a tiled church, a long lunch by the river, "
        "a slow walk up\n"
        "to the cathedral and the viewpoint, then a small dinner in a family tavern near the square.\n"
        "Day 2: the art museum in the park after breakfast, a port cellar across the bridge, "
        "the bookshop with the staircase,\n"
        "the beach at sunset and a last dinner with a view over the roofs of the old town."
    )

    def sample(p: TravelPrompt, seed: int) -> Answer:  # seed 0: every interest but no city; seed 1: city, one interest
        return Answer(
            f"Food and art all the way.\n{body}" if seed == 0 else f"Porto in two days.\n{body.replace('art ', '')}",
            True,
        )

    rows, _, counts = rejection_sample([prompt], sample, samples_per_prompt=2, min_score=0.8, log=lambda *_: None)
    assert counts["kept"] == 1 and rows[0]["messages"][1]["content"].startswith("Porto in two days.")
    rows, _, counts = rejection_sample(
        [prompt], lambda p, seed: sample(p, 0), samples_per_prompt=1, min_score=0.8, log=lambda *_: None
    )
    assert counts["kept"] == 0  # its mean passes 0.8, but the city is never named


def test_data_travel_command_writes_every_file_and_the_counts(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import tunelab.experiments.travel_data as travel_data
    from tunelab.cli import app

    days_text = [
        "breakfast in the covered market, the cathedral and its cloister, a tram up to the castle, lunch of grilled\n"
        "sardines by the river, the tile museum in the afternoon and an early dinner in a family tavern.",
        "a ferry across the estuary, port cellars with a tasting, the bookshop with the red staircase, a long beach\n"
        "walk at sunset and a farewell meal overlooking the bridge and the lights of the old town.",
        "a morning train along the coast to a fishing village, a swim if the sea allows it, a seafood lunch on the\n"
        "harbour wall and a slow afternoon back in the botanical garden with its greenhouses.",
    ]

    def plan(days: int) -> str:
        return "\n".join(f"Day {d}: {days_text[d - 1]}" for d in range(1, days + 1))

    exchanges = [None, ("Plan a 2-day trip to Porto please", plan(2)), ("What is 2+2?", "4")]
    monkeypatch.setattr(travel_data, "sharegpt_first_exchanges", lambda: iter(exchanges))
    seen = {}

    def fake_sampler(gguf, threads=None, day_grammar=False):  # complete plans for trips of up to 3 days only
        seen["day_grammar"] = day_grammar
        return lambda prompt, seed: Answer(
            f"{prompt.city}: {', '.join(prompt.preferences)}.\n{plan(prompt.days)}" if prompt.days <= 3 else "No.", True
        )

    monkeypatch.setattr(travel_data, "gguf_sampler", fake_sampler)
    out = tmp_path / "travel"
    earlier = tmp_path / "earlier.jsonl"
    request = {"role": "user", "content": "Plan a 2-day trip to Porto please"}
    earlier_rows = [
        {
            "messages": [request, {"role": "assistant", "content": f"Porto{where}.\n{plan(2)}"}],
            "city": "Porto",
            "days": 2,
        }
        for where in ("", " and then Madrid")
    ]
    earlier.write_text("".join(json.dumps(r) + "\n" for r in earlier_rows))
    result = CliRunner().invoke(app, [
        "data", "travel", str(out), "--prompts", "10", "--samples", "2", "--grammar", "--min-score", "0.5",
        "--recheck", str(earlier),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "counts.json").read_text())
    assert counts["itineraries"]["records"] == 3 and counts["itineraries"]["after_exact_dedup"] == 1
    short = sum(p.days <= 3 for p in synthetic_prompts(10, seed=0, max_days=5))
    assert counts["self_generated"]["samples"] == 20 and counts["self_generated"]["kept"] == short > 0
    assert counts["self_generated"]["day_grammar"] is True and seen == {"day_grammar": True}
    assert len((out / "self-generated.jsonl").read_text().splitlines()) == short
    assert len((out / "itineraries.jsonl").read_text().splitlines()) == 1
    assert counts["rechecked"]["plans"] == 2 and counts["rechecked"]["kept"] == 1
    assert [json.loads(line) for line in (out / "rechecked.jsonl").read_text().splitlines()] == earlier_rows[:1]
