"""A llama.cpp grammar (GBNF) for a travel plan of exactly N days.

    grammar = day_plan_grammar(3)   # text for llama_cpp.LlamaGrammar.from_string

The plan it allows: one opening line, then "Day 1: <title>" ... "Day N: <title>", each followed by 2-3 "- " items,
then an optional closing line, then end-of-turn (llama.cpp allows only end-of-generation tokens once the grammar
is complete). It fixes the structure the travel rubric checks (the day count, day by day, a clean end), not the
content: which places, and whether they are in the right city, is still the model's. The study reports it as a
decoding lever apart from the training levers, and `tunelab data travel --grammar` uses it to make the base model
write correctly sized plans that rejection sampling then picks from.
"""

from __future__ import annotations

from tunelab.errors import UserError

MAX_DAYS = 14  # the planner's own limit
ITEMS_PER_DAY = (2, 3)
LINE_CHARS = (12, 160)  # a free-text line: long enough to say something, short enough not to ramble
CHARS_PER_TOKEN = 2.5  # below what English text averages, so the budget covers the longest plan allowed


def token_budget(days: int) -> int:
    """New tokens enough for the longest plan the grammar allows, so a constrained plan is never cut."""
    line = LINE_CHARS[1] + 3  # with its "- " and newline
    longest = 2 * line + days * (line + ITEMS_PER_DAY[1] * line + 1)  # opening + closing + the days
    return int(longest / CHARS_PER_TOKEN) + 1


def day_plan_grammar(days: int) -> str:
    """GBNF text for a plan with exactly `days` "Day n" sections, numbered 1..days."""
    if not 1 <= days <= MAX_DAYS:
        raise UserError(f"days: a day-plan grammar needs 1 to {MAX_DAYS} days (got {days})")
    low, high = LINE_CHARS
    fewest, most = ITEMS_PER_DAY
    day_rules = "\n".join(f'day{n} ::= "Day {n}: " line "\\n" items' for n in range(1, days + 1))
    return (
        "\n".join(
            [
                "root ::= opening " + " ".join(f"day{n}" for n in range(1, days + 1)) + " closing?",
                'opening ::= text "\\n\\n"',
                day_rules,
                f'items ::= item{{{fewest},{most}}} "\\n"',
                'item ::= "- " text "\\n"',
                f"line ::= [^\\n]{{{low},{high}}}",
                # Any other line must not read as a day heading ("Day 4", "- Day 4", "## Day 4" count as sections),
                # so it starts with neither "d" nor a Markdown marker.
                f"text ::= [^Dd#*>_+\\- \\t\\n0-9] [^\\n]{{{low - 1},{high - 1}}}",
                "closing ::= text",
            ]
        )
        + "\n"
    )
