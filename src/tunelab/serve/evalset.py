"""A frozen regression set of prompts from app feedback (`tunelab feedback export DB --format evalset`).

File format: prompts JSONL, the format `tunelab eval RUN --prompts FILE` reads (`prompt`, plus `city` / `days` /
`preferences` for Travel Planner rows), plus `messages` (the whole conversation the model saw), `tab` and
`reference` (the better answer, or the answer picked side by side) when feedback gave one. The first line is a
header record `{"evalset": {...}}` with the set's version; the version is the sha256 of the prompt records, so
the same prompts always give the same file name `evalset-<version>.jsonl`.

Held out: the file is written next to the feedback database and `tunelab feedback export` in a training format
(sft / dpo / kto) leaves out every prompt that is in any `evalset-*.jsonl` there (see `frozen_prompt_keys`).

Which prompts: the ones the model got wrong first — thumbs-down answers that have a better answer, then other
thumbs-down answers, then other rows with a reference (corrections, side-by-side winners, "both bad" picks),
then the rest; each prompt once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.eval.rubric import is_evalset_header
from tunelab.io import jsonl_records, write_jsonl
from tunelab.serve.feedback_store import iter_pairwise_rows, iter_rows

EVALSET_GLOB = "evalset-*.jsonl"
DEFAULT_MAX_PROMPTS = 100


def last_user_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def prompt_key(messages: list[dict[str, str]]) -> str:
    """What makes two feedback rows "the same prompt": the last user message, case and spacing ignored."""
    return " ".join(last_user_text(messages).casefold().split())


@dataclass(frozen=True)
class EvalsetFile:
    path: Path
    version: str
    records: list[dict[str, Any]]


def _planner_fields(inputs: dict[str, Any]) -> dict[str, Any]:
    preferences = [str(i) for i in inputs.get("interests") or []]
    if str(inputs.get("preferences") or "").strip():
        preferences.append(str(inputs["preferences"]).strip())
    fields: dict[str, Any] = {
        "city": inputs.get("city") or None,
        "days": inputs.get("days"),
        "preferences": preferences,
    }
    return {k: v for k, v in fields.items() if v not in (None, [])}


def _record(row: dict[str, Any], reference: str) -> dict[str, Any]:
    record: dict[str, Any] = {"prompt": last_user_text(row["messages"]), "tab": row["tab"]}
    if row["tab"] == "planner":
        record.update(_planner_fields(row.get("inputs") or {}))
    record["messages"] = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if reference:
        record["reference"] = reference
    return record


def _candidates(rows: Iterable[dict[str, Any]], pairwise_rows: Iterable[dict[str, Any]]):
    """(priority, order, record) for every row: lower priority goes into the set first."""
    order = 0
    for row in rows:
        better = row["better_answer"].strip()
        priority = (0 if better else 1) if row["rating"] == -1 else (2 if better else 3)
        order += 1
        yield priority, order, _record(row, better)
    for row in pairwise_rows:
        winner = {"a": row["answer_a"], "b": row["answer_b"]}.get(row["pick"], "")
        order += 1
        yield 2, order, _record(row, winner.strip())


def select_prompts(
    rows: Iterable[dict[str, Any]], pairwise_rows: Iterable[dict[str, Any]] = (), max_prompts: int = DEFAULT_MAX_PROMPTS
) -> list[dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    for _, _, record in sorted(_candidates(rows, pairwise_rows), key=lambda c: (c[0], c[1])):
        key = prompt_key(record["messages"])
        if key and key not in chosen:
            chosen[key] = record
        if len(chosen) >= max_prompts:
            break
    return list(chosen.values())


def content_version(records: list[dict[str, Any]]) -> str:
    canonical = "\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def write_evalset(records: list[dict[str, Any]], out_dir: Path, source: str) -> Path:
    """Write `evalset-<version>.jsonl` atomically; an existing file of the same version is the same set (kept)."""
    if not records:
        raise UserError(f"{source}: no feedback rows to freeze into a regression set yet")
    version = content_version(records)
    path = Path(out_dir) / f"evalset-{version}.jsonl"
    if path.is_file():
        return path
    header = {
        "evalset": {
            "version": version,
            "prompts": len(records),
            "with_reference": sum("reference" in r for r in records),
            "source": source,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "held_out": "never exported for training (tunelab feedback export skips these prompts)",
        }
    }
    write_jsonl(path, [header, *records])
    return path


def export_evalset(
    db_path: str | Path, out_dir: str | Path | None = None, max_prompts: int = DEFAULT_MAX_PROMPTS
) -> Path:
    db_path = Path(db_path)
    if max_prompts < 1:
        raise UserError(f"--max-prompts: must be >= 1 (got {max_prompts})")
    records = select_prompts(iter_rows(db_path), iter_pairwise_rows(db_path), max_prompts)
    return write_evalset(records, Path(out_dir) if out_dir else db_path.parent, db_path.name)


def read_evalset(path: str | Path) -> EvalsetFile:
    """The header's version and the prompt records (one-line errors naming file:line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: regression set not found")
    version, records = "", []
    for where, record in jsonl_records(path):
        if is_evalset_header(record):
            version = str(record["evalset"].get("version", ""))
            continue
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UserError(f"{where}: needs a non-empty string `prompt`")
        record.setdefault("messages", [{"role": "user", "content": record["prompt"]}])
        records.append(record)
    return EvalsetFile(path, version or content_version(records), records)


def frozen_prompt_keys(db_path: str | Path) -> set[str]:
    """Prompts of every regression set frozen next to the database: these must never reach training data."""
    keys: set[str] = set()
    for path in sorted(Path(db_path).parent.glob(EVALSET_GLOB)):
        keys.update(prompt_key(r["messages"]) for r in read_evalset(path).records)
    return keys
