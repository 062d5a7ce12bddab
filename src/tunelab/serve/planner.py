"""The Travel Planner: its choices, the validation of a request, and the prompt (a Jinja template file for
the user message and a text file for the system message, both in prompts/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from tunelab.serve.limits import InputError, Limits, check_length, clean_text

PROMPTS_DIR = Path(__file__).parent / "prompts"

INTERESTS = (
    "food",
    "museums",
    "nature",
    "nightlife",
    "family",
    "history",
    "art",
    "shopping",
    "architecture",
    "outdoor sports",
)
BUDGETS = ("budget", "mid-range", "luxury")
PACES = ("relaxed", "balanced", "packed")
WHEN_CHOICES = (
    "any time", "spring", "summer", "autumn", "winter",
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


@dataclass
class PlannerInputs:
    city: str
    days: int
    when: str
    budget: str
    pace: str
    interests: list[str]
    preferences: str


def validate_planner_inputs(
    city: Any, days: Any, when: Any, budget: Any, pace: Any, interests: Any, preferences: Any, limits: Limits
) -> PlannerInputs:
    city = " ".join(clean_text(city).split())
    if not city:
        raise InputError("Please enter a city to plan a trip to.")
    check_length("The city name", city, limits.max_city_chars)
    try:
        days_number = float(days)
    except (TypeError, ValueError):
        raise InputError(
            f"The number of days must be a whole number from {limits.min_days} to {limits.max_days}."
        ) from None
    if not days_number.is_integer() or not limits.min_days <= days_number <= limits.max_days:
        raise InputError(
            f"Please choose between {limits.min_days} and {limits.max_days} days (got {days_number:g}). "
            "For longer journeys, plan one city at a time."
        )
    when = clean_text(when).strip() or "any time"
    if when not in WHEN_CHOICES:
        raise InputError(f"Travel time must be one of: {', '.join(WHEN_CHOICES)}.")
    if budget not in BUDGETS:
        raise InputError(f"Budget must be one of: {', '.join(BUDGETS)}.")
    if pace not in PACES:
        raise InputError(f"Pace must be one of: {', '.join(PACES)}.")
    interests = list(interests or [])
    unknown = [i for i in interests if i not in INTERESTS]
    if unknown:
        raise InputError(f"Unknown interests: {', '.join(map(str, unknown))}.")
    preferences = check_length("Your preferences", clean_text(preferences).strip(), limits.max_preferences_chars)
    return PlannerInputs(city, int(days_number), when, budget, pace, interests, preferences)


class PlannerPrompt:
    """The Travel Planner's prompt: a Jinja template file (user message) + a text file (system message)."""

    def __init__(self, template_path: Path | None = None, system_path: Path | None = None):
        template_path = template_path or PROMPTS_DIR / "travel_planner.jinja"
        system_path = system_path or PROMPTS_DIR / "travel_planner_system.txt"
        env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self.template = env.from_string(template_path.read_text(encoding="utf-8"))
        self.system = system_path.read_text(encoding="utf-8").strip()

    def messages(self, inputs: PlannerInputs) -> list[dict[str, str]]:
        when = "" if inputs.when == "any time" else inputs.when
        user = self.template.render(**{**asdict(inputs), "when": when}).strip()
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
