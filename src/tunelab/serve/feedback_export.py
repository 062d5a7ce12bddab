"""Stored feedback as the next round of training data (`tunelab feedback export`) and as a CSV download.

Export contract (`export_records`)
- `sft`: OpenAI-style `{"messages": [...]}` rows (a valid `data.sources` entry for `tunelab data prepare`):
  thumbs-up answers as they were, and any answer with a "better answer" using the correction instead.
- `dpo`: TRL's conversational preference format `{"prompt": [...], "chosen": [...], "rejected": [...]}`
  from thumbs-down answers that have a better answer, and from side-by-side picks (winner = chosen; "both bad"
  picks are not pairs and are skipped).
- `kto`: TRL's unpaired format `{"prompt": [...], "completion": [...], "label": bool}` from thumbs up / down.
- `sft`, `dpo` and `kto` leave out every prompt of a frozen regression set (`evalset-*.jsonl`, serve/evalset.py)
  stored next to the database: those prompts are held out for `tunelab promote`, never trained on.
- `jsonl`: every row with its JSON columns decoded (the raw evaluation set).
- `evalset`: the frozen regression set itself, written by serve/evalset.py.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.io import write_jsonl
from tunelab.serve.evalset import frozen_prompt_keys, prompt_key
from tunelab.serve.feedback_store import FEEDBACK, iter_pairwise_rows, iter_rows

EXPORT_FORMATS = ("sft", "dpo", "kto", "jsonl", "evalset")
TRAINING_FORMATS = ("sft", "dpo", "kto")  # formats that feed `tunelab train`: frozen regression prompts stay out


def _prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


def _conversation(row: dict[str, Any], answer: str) -> list[dict[str, str]]:
    return _prompt(row) + [{"role": "assistant", "content": answer}]


def sft_record(row: dict[str, Any]) -> dict[str, Any] | None:
    """A correction wins over the original answer; an unrated-good answer without correction is skipped."""
    better = row["better_answer"].strip()
    if better:
        return {"messages": _conversation(row, better)}
    if row["rating"] == 1 and row["response"].strip():
        return {"messages": _conversation(row, row["response"])}
    return None


def dpo_record(row: dict[str, Any]) -> dict[str, Any] | None:
    better = row["better_answer"].strip()
    if row["rating"] != -1 or not better or better == row["response"].strip():
        return None
    return {
        "prompt": _prompt(row),
        "chosen": [{"role": "assistant", "content": better}],
        "rejected": [{"role": "assistant", "content": row["response"]}],
    }


def dpo_record_from_pick(row: dict[str, Any]) -> dict[str, Any] | None:
    """A side-by-side pick: the picked answer is chosen, the other rejected; "both bad" and ties are no pair."""
    if row["pick"] not in ("a", "b") or row["answer_a"].strip() == row["answer_b"].strip():
        return None
    chosen, rejected = (row["answer_a"], row["answer_b"]) if row["pick"] == "a" else (row["answer_b"], row["answer_a"])
    return {
        "prompt": _prompt(row),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def kto_record(row: dict[str, Any]) -> dict[str, Any] | None:
    """A thumbs up / down as an unpaired example (TRL's KTO format: label True = desirable)."""
    if not row["response"].strip():
        return None
    return {
        "prompt": _prompt(row),
        "completion": [{"role": "assistant", "content": row["response"]}],
        "label": row["rating"] == 1,
    }


def export_records(
    rows: Iterable[dict[str, Any]], fmt: str, pairwise_rows: Iterable[dict[str, Any]] = ()
) -> Iterator[dict[str, Any]]:
    if fmt not in EXPORT_FORMATS or fmt == "evalset":
        raise UserError(f"--format: choose one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    convert = {"sft": sft_record, "dpo": dpo_record, "kto": kto_record, "jsonl": lambda row: row}[fmt]
    for row in rows:
        record = convert(row)
        if record is not None:
            yield record
    if fmt == "dpo":
        for row in pairwise_rows:
            record = dpo_record_from_pick(row)
            if record is not None:
                yield record


def export_feedback(
    db_path: str | Path,
    out_path: str | Path,
    fmt: str,
    min_rating: int | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """`tunelab feedback export`: rows -> sft / dpo / kto / jsonl file. Returns the number of records written.

    Training formats leave out the prompts of every frozen regression set next to the database (and say so)."""
    if not Path(db_path).is_file():
        raise UserError(f"{db_path}: feedback database not found")
    rows = iter_rows(db_path, min_rating=min_rating)
    pairs: Iterable[dict[str, Any]] = iter_pairwise_rows(db_path) if min_rating is None else ()
    if fmt in TRAINING_FORMATS:
        held_out = frozen_prompt_keys(db_path)
        if held_out:
            kept = lambda row: prompt_key(row["messages"]) not in held_out  # noqa: E731
            rows, pairs = list(rows), list(pairs)
            left_out = sum(not kept(r) for r in rows) + sum(not kept(r) for r in pairs)
            rows, pairs = filter(kept, rows), filter(kept, pairs)
            if log and left_out:
                log(f"left out {left_out} feedback row(s) whose prompt is in a frozen regression set (evalset-*.jsonl)")
    return write_jsonl(out_path, export_records(rows, fmt, pairs))


def rows_to_csv(rows: Iterable[dict[str, Any]]) -> str:
    """Feedback rows (as `iter_rows` reads them) as CSV text, JSON columns re-encoded, formulas defused."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FEEDBACK.column_names)
    writer.writeheader()
    json_columns = FEEDBACK.json_columns
    for row in rows:
        writer.writerow(
            {k: _csv_cell(json.dumps(v, ensure_ascii=False) if k in json_columns else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ is a formula in spreadsheet apps; user text must stay text there.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value
