"""How the data stage deals with bad input.

Two levels:
- a *record* problem (a malformed JSONL line, a conversation that starts with the assistant, ...) is skipped and
  counted by reason in report.json with its first few locations (`file:line` or `file#index`);
  with `data.on_error: fail` the first one stops the run instead;
- a *file* problem (unreadable, empty, not UTF-8, unknown format, nothing usable, every row filtered out)
  raises `DataError` at once: one line naming the file and the problem.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from tunelab.errors import UserError

FIRST_LOCATIONS = 5  # locations kept per reason: enough to find the pattern, small enough to read

# Reasons that mean the input is broken. `data.on_error: fail` stops on these; the other reasons are filters
# doing what the config asked (too few turns, keyword slice, token length, duplicates) and never stop a run.
PROBLEM_REASONS = {
    "malformed_json": "not valid JSON",
    "unparsed_tail": "file ends inside a record (truncated); the rest was not parsed",
    "stream_error": "a streamed dataset raised an error at this record; the source's later records were not read",
    "not_a_record": "record is not an object/list",
    "unknown_format": "no known format (ShareGPT, OpenAI messages, Alpaca, prompt/response)",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "too_long": "record longer than data.max_record_chars",
    "invalid_utf8": "text is not valid UTF-8 (undecodable bytes or lone surrogate escapes)",
    "unknown_role": "unknown role name",
    "empty_message": "a message is empty",
    "starts_with_assistant": "conversation starts with the assistant (after the optional system message)",
    "misplaced_system": "a system message after the first message",
    "prompt_not_user": "a preference prompt does not end with a user message",
    "identical_pair": "a preference pair whose chosen and rejected completions are the same",
}
FILTER_REASONS = {
    "too_few_turns": "fewer user/assistant turns than data.min_turns",
    "too_many_turns": "more user/assistant turns than data.max_turns",
    "short_assistant": "an assistant reply shorter than data.min_assistant_chars",
    "no_keyword": "mentions none of the source's keywords",
    "first_turn_too_long": "first user+assistant exchange longer than train.max_seq_len (truncation: truncate)",
    "over_max_seq_len": "conversation longer than train.max_seq_len (truncation: drop)",
    "no_label_tokens": "no assistant token left to learn from",
}
REPAIRS = {
    "merged_repeated_role": "consecutive messages of the same role were merged (joined by a blank line)",
    "dropped_trailing_user": "a final user message without a reply was removed",
    "dropped_empty_system": "an empty system message was removed",
}


class DataError(UserError):
    """A data problem the user can fix; the message is one line naming the file/record."""


class RecordProblem(Exception):
    """One record cannot be used. `reason` is a key of PROBLEM_REASONS or FILTER_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class Tally:
    """Counts per reason plus the first few locations of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        if len(self.first[reason]) < FIRST_LOCATIONS:
            self.first[reason].append(where)

    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, dict]:
        return {r: {"count": n, "first": self.first[r]} for r, n in self.counts.most_common()}


class ProblemLog:
    """Where every skipped record and every repair is written down, overall and per source."""

    def __init__(self, on_error: str = "skip") -> None:
        self.fail_fast = on_error == "fail"
        self.dropped = Tally()
        self.repaired = Tally()
        self.dropped_by_source: dict[str, Counter[str]] = defaultdict(Counter)

    def drop(self, reason: str, where: str, source: str, detail: str = "", n: int = 1) -> None:
        if self.fail_fast and reason in PROBLEM_REASONS:
            what = detail or PROBLEM_REASONS[reason]
            raise DataError(f"{where}: {what} [{reason}] (data.on_error=fail; use `skip` to count and skip)")
        self.dropped.add(reason, where, n)
        self.dropped_by_source[source][reason] += n

    def repair(self, reason: str, where: str) -> None:
        self.repaired.add(reason, where)

    def top_reasons(self, source: str, n: int = 3) -> str:
        common = self.dropped_by_source[source].most_common(n)
        return ", ".join(f"{r} {c}" for r, c in common) or "none"
