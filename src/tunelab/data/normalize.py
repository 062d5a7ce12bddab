"""(role name, text) pairs -> the canonical conversation, or a RecordProblem saying why not.

Canonical (docs/design.md): [{"role": "system"|"user"|"assistant", "content": str}], an optional system message
first, then user/assistant alternating, starting with user and ending with assistant.

Decisions (each counted in report.json):
- text (`data.normalize`): Unicode NFC, CRLF -> LF, control characters / zero-width spaces / BOMs removed,
  trailing spaces on lines removed, 3+ newlines -> 2, stripped. Role names are always mapped.
- repeated roles (two user or two assistant messages in a row) are *merged* with a blank line: ShareGPT often
  splits one message in two, and dropping would lose otherwise good conversations (repair `merged_repeated_role`);
- a trailing user message with no reply is removed (repair `dropped_trailing_user`);
- dropped: unknown role names, empty messages, text that is not valid Unicode, a system message that is not
  the first message, conversations that start with the assistant (the reply would answer nothing the model sees),
  too few/many turns, an assistant reply shorter than data.min_assistant_chars, no keyword of the source.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from tunelab.config import DataConfig
from tunelab.data.formats import Pairs
from tunelab.data.problems import RecordProblem

Message = dict[str, str]

ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

_SURROGATES = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or lone \\ud83d escapes
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_SPACES = re.compile(r"[ \t]+(?=\n)")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    if not text.isascii():
        if not unicodedata.is_normalized("NFC", text):  # the check is much cheaper than normalising
            text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = _TRAILING_SPACES.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def keyword_pattern(keywords: list[str]) -> re.Pattern | None:
    """Whole-word, case-insensitive match of any keyword (so `trip` does not match `strip`)."""
    words = [k.strip() for k in keywords if k.strip()]
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def to_messages(pairs: Pairs, normalize: bool, repair: Callable[[str], None]) -> list[Message]:
    messages: list[Message] = []
    for role_name, text in pairs:
        role = ROLE_NAMES.get(role_name.strip().lower())
        if role is None:
            raise RecordProblem("unknown_role", f"unknown role `{role_name[:40]}`")
        if _SURROGATES.search(text):
            raise RecordProblem("invalid_utf8", f"{role} message is not valid UTF-8 text")
        content = normalize_text(text) if normalize else text
        if not content.strip():
            if role == "system":
                repair("dropped_empty_system")
                continue
            raise RecordProblem("empty_message", f"empty {role} message")
        messages.append({"role": role, "content": content})
    return messages


def merge_repeated_roles(messages: list[Message], repair: Callable[[str], None]) -> list[Message]:
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + "\n\n" + message["content"]}
            repair("merged_repeated_role")
        else:
            merged.append(message)
    return merged


def canonical_conversation(
    pairs: Pairs, data_cfg: DataConfig, keywords: re.Pattern | None, repair: Callable[[str], None]
) -> list[Message]:
    """Normalise and filter one conversation; raises RecordProblem with the reason it is dropped."""
    messages = to_messages(pairs, data_cfg.normalize, repair)
    if any(m["role"] == "system" for m in messages[1:]):
        raise RecordProblem("misplaced_system", "a system message after the first message")
    messages = merge_repeated_roles(messages, repair)
    system, turns = (messages[:1], messages[1:]) if messages and messages[0]["role"] == "system" else ([], messages)
    if turns and turns[0]["role"] != "user":
        raise RecordProblem("starts_with_assistant", "the first turn is the assistant's")
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]
        repair("dropped_trailing_user")
    if len(turns) < data_cfg.min_turns or not turns:
        raise RecordProblem("too_few_turns", f"{len(turns)} turns (data.min_turns={data_cfg.min_turns})")
    if len(turns) > data_cfg.max_turns:
        raise RecordProblem("too_many_turns", f"{len(turns)} turns (data.max_turns={data_cfg.max_turns})")
    if any(m["role"] == "assistant" and len(m["content"]) < data_cfg.min_assistant_chars for m in turns):
        raise RecordProblem(
            "short_assistant", f"an assistant reply is shorter than {data_cfg.min_assistant_chars} characters"
        )
    if keywords is not None and not any(keywords.search(m["content"]) for m in turns):
        raise RecordProblem("no_keyword", "mentions none of the keywords")
    return system + turns
