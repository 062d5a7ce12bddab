"""Record formats -> a list of (role name, text) pairs. Role names are mapped later (normalize.py).

Detected per record when `format: auto`:
- ShareGPT:         {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": "..."}], "system"?: "..."}
- OpenAI messages:  {"messages": [{"role": "user"|"assistant"|"system", "content": "..." | [{"type": "text", ...}]}]}
- Alpaca:           {"instruction": "...", "input"?: "...", "output": "...", "system"?: "..."}
- prompt/response:  {"prompt"|"question": "...", "response"|"answer"|"completion": "..."}
- chatterbot:       ["question", "answer", "follow-up", ...]   (alternating user / assistant)
"""

from __future__ import annotations

from typing import Any

from tunelab.data.problems import RecordProblem

Pairs = list[tuple[str, str]]

PROMPT_KEYS = ("prompt", "question")
RESPONSE_KEYS = ("response", "answer", "completion")


def detect_format(record: Any) -> str | None:
    if isinstance(record, list):
        return "chatterbot"
    if not isinstance(record, dict):
        return None
    if "conversations" in record or "conversation" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if any(k in record for k in PROMPT_KEYS) and any(k in record for k in RESPONSE_KEYS):
        return "prompt_response"
    return None


def record_to_pairs(record: Any, fmt: str = "auto") -> Pairs:
    """Convert one raw record; raises RecordProblem (unknown_format, missing_field, wrong_type, not_a_record)."""
    if not isinstance(record, (dict, list)):
        raise RecordProblem("not_a_record", f"record is a {type(record).__name__}, not an object")
    detected = detect_format(record) if fmt == "auto" else fmt
    if detected is None:
        keys = ", ".join(sorted(map(str, record))[:6]) if isinstance(record, dict) else ""
        raise RecordProblem("unknown_format", f"no known format (keys: {keys or 'none'})")
    return CONVERTERS[detected](record)


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise RecordProblem("missing_field", f"`{field}` is null")
    raise RecordProblem("wrong_type", f"`{field}` must be text, got {type(value).__name__}")


def _field(record: dict, *names: str) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise RecordProblem("missing_field", f"missing `{names[0]}`")


def _list_field(record: Any, *names: str) -> list:
    if not isinstance(record, dict):
        raise RecordProblem("not_a_record", f"record is a {type(record).__name__}, not an object")
    value = _field(record, *names)
    if not isinstance(value, list):
        raise RecordProblem("wrong_type", f"`{names[0]}` must be a list, got {type(value).__name__}")
    return value


def _optional_system(record: dict) -> Pairs:
    system = record.get("system")
    return [("system", _text(system, "system"))] if system else []


def sharegpt(record: Any) -> Pairs:
    turns = _list_field(record, "conversations", "conversation")
    pairs = _optional_system(record)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordProblem("wrong_type", f"conversations[{i}] must be an object, got {type(turn).__name__}")
        role = _field(turn, "from", "role")
        pairs.append(
            (
                _text(role, f"conversations[{i}].from"),
                _text(_field(turn, "value", "content"), f"conversations[{i}].value"),
            )
        )
    return pairs


def openai(record: Any) -> Pairs:
    pairs = []
    for i, message in enumerate(_list_field(record, "messages")):
        if not isinstance(message, dict):
            raise RecordProblem("wrong_type", f"messages[{i}] must be an object, got {type(message).__name__}")
        role = _text(_field(message, "role"), f"messages[{i}].role")
        pairs.append((role, _openai_content(_field(message, "content"), f"messages[{i}].content")))
    return pairs


def _openai_content(content: Any, field: str) -> str:
    """Plain text, or the list-of-parts form: the text parts joined (images and other parts are not text)."""
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RecordProblem("wrong_type", f"`{field}` has no text parts")
        return "\n".join(texts)
    return _text(content, field)


def alpaca(record: Any) -> Pairs:
    if not isinstance(record, dict):
        raise RecordProblem("not_a_record", "record is not an object")
    instruction = _text(_field(record, "instruction"), "instruction")
    extra = record.get("input") or ""
    prompt = f"{instruction}\n\n{_text(extra, 'input')}" if extra else instruction
    return [*_optional_system(record), ("user", prompt), ("assistant", _text(_field(record, "output"), "output"))]


def prompt_response(record: Any) -> Pairs:
    if not isinstance(record, dict):
        raise RecordProblem("not_a_record", "record is not an object")
    prompt = _text(_field(record, *PROMPT_KEYS), "prompt")
    response = _text(_field(record, *RESPONSE_KEYS), "response")
    return [*_optional_system(record), ("user", prompt), ("assistant", response)]


def chatterbot(record: Any) -> Pairs:
    if not isinstance(record, list):
        raise RecordProblem("wrong_type", "a chatterbot conversation must be a list of lines")
    roles = ("user", "assistant")
    return [(roles[i % 2], _text(line, f"[{i}]")) for i, line in enumerate(record)]


CONVERTERS = {
    "sharegpt": sharegpt,
    "openai": openai,
    "alpaca": alpaca,
    "prompt_response": prompt_response,
    "chatterbot": chatterbot,
}
