"""Durable feedback storage (SQLite) and its conversion into the next round of training data.

Storage contract
- One table `feedback` with explicit columns (see `SCHEMA`); the schema version is `PRAGMA user_version`.
- WAL journal + `synchronous=FULL`: a row is on disk when `FeedbackStore.add` returns, so the app only
  acknowledges a submission after its transaction committed (a SIGKILL right after loses nothing).
- One write connection shared behind a lock (writes are tiny; the lock keeps one transaction per write and
  avoids SQLITE_BUSY between the app's worker threads); readers open their own short-lived connections.
  `busy_timeout` covers other processes (e.g. `tunelab feedback export` while the app runs).

Export contract (`export_records`)
- `sft`: OpenAI-style `{"messages": [...]}` rows (a valid `data.sources` entry for `tunelab data prepare`):
  thumbs-up answers as they were, and any answer with a "better answer" using the correction instead.
- `dpo`: TRL's conversational preference format `{"prompt": [...], "chosen": [...], "rejected": [...]}`
  from thumbs-down answers that have a better answer.
- `jsonl`: every row with its JSON columns decoded (the raw evaluation set).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from tunelab.errors import UserError
from tunelab.io import atomic_path

SCHEMA_VERSION = 1

REASONS = (
    "incorrect",
    "unhelpful",
    "hallucinated place or fact",
    "unsafe or biased",
    "too long",
    "too short",
    "wrong language",
    "other",
)
TABS = ("chat", "planner")
EXPORT_FORMATS = ("sft", "dpo", "jsonl")

# Server-side limits on what one submission may store (the UI enforces the same, but the API is public).
MAX_COMMENT_CHARS = 2_000
MAX_BETTER_ANSWER_CHARS = 8_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    TEXT    NOT NULL,                       -- ISO 8601, UTC
    session_id    TEXT    NOT NULL,                       -- anonymous, random per browser session
    tab           TEXT    NOT NULL CHECK (tab IN ('chat', 'planner')),
    rating        INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    reasons       TEXT    NOT NULL DEFAULT '[]',          -- JSON list of REASONS
    comment       TEXT    NOT NULL DEFAULT '',
    better_answer TEXT    NOT NULL DEFAULT '',
    messages      TEXT    NOT NULL,                       -- JSON: conversation sent to the model
    inputs        TEXT    NOT NULL DEFAULT '{}',          -- JSON: chat prompt or planner form
    response      TEXT    NOT NULL,                       -- the full answer that was rated
    model_id      TEXT    NOT NULL,
    params        TEXT    NOT NULL DEFAULT '{}',          -- JSON: generation parameters
    app_version   TEXT    NOT NULL,
    submission_id TEXT    UNIQUE                          -- optional client key: a retried submit is stored once
);
CREATE INDEX IF NOT EXISTS feedback_created_at ON feedback (created_at);
"""

JSON_COLUMNS = ("reasons", "messages", "inputs", "params")
COLUMNS = (
    "id", "created_at", "session_id", "tab", "rating", "reasons", "comment", "better_answer",
    "messages", "inputs", "response", "model_id", "params", "app_version", "submission_id",
)  # fmt: skip

# Hugging Face tokens look like `hf_` + 30+ letters/digits. People paste them into comment boxes by accident;
# they must never reach the database (which may itself be pushed to the Hub).
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def redact_secrets(text: str) -> str:
    return _HF_TOKEN.sub("[redacted token]", text)


@dataclass
class FeedbackRecord:
    """One rated answer, with everything needed to reproduce it and to learn from it."""

    tab: Literal["chat", "planner"]
    rating: int  # +1 thumbs up, -1 thumbs down
    messages: list[dict[str, str]]  # what the model saw (system + history + user), without the answer
    response: str
    model_id: str
    app_version: str
    session_id: str
    reasons: list[str] = field(default_factory=list)
    comment: str = ""
    better_answer: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    submission_id: str | None = None  # idempotency key chosen by the client (e.g. a UUID)

    def validate(self) -> FeedbackRecord:
        if self.tab not in TABS:
            raise UserError(f"feedback: unknown tab {self.tab!r}")
        if self.rating not in (-1, 1):
            raise UserError(f"feedback: rating must be +1 or -1 (got {self.rating!r})")
        unknown = [r for r in self.reasons if r not in REASONS]
        if unknown:
            raise UserError(f"feedback: unknown reason(s) {unknown}; choose from {list(REASONS)}")
        if len(self.comment) > MAX_COMMENT_CHARS:
            raise UserError(f"feedback: the comment is longer than {MAX_COMMENT_CHARS} characters")
        if len(self.better_answer) > MAX_BETTER_ANSWER_CHARS:
            raise UserError(f"feedback: the better answer is longer than {MAX_BETTER_ANSWER_CHARS} characters")
        if self.submission_id is not None and not _SUBMISSION_ID.fullmatch(self.submission_id):
            raise UserError("feedback: submission_id must be 1-64 letters, digits, '-' or '_'")
        return self


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: str | Path, *, timeout_s: float = 30.0) -> sqlite3.Connection:
    """A connection with the settings every user of the feedback DB needs (WAL, busy timeout, durable commits)."""
    conn = sqlite3.connect(str(path), timeout=timeout_s, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")  # fsync on every commit: acknowledged means on disk
    conn.row_factory = sqlite3.Row
    return conn


class FeedbackStore:
    """Thread-safe writer + readers over one SQLite feedback database."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder; --feedback-db needs a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = connect(self.path)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a usable feedback database ({exc})") from None
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path}: feedback schema v{version} is newer than this tunelab (v{SCHEMA_VERSION}); upgrade tunelab"
            )
        if version < SCHEMA_VERSION:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # Statement by statement: executescript() would commit on its own, outside this transaction.
                for statement in (s.strip() for s in SCHEMA.split(";")):
                    if statement:
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---------------------------------------------------------------------------------- write
    def add(self, record: FeedbackRecord) -> int:
        """Insert one row in its own transaction; returns its id once committed (durable).
        A record whose submission_id is already stored is not stored again: the existing id is returned, so a
        client that lost the reply (network, server restart) can safely send the same submission again."""
        record.validate()
        row = {
            "created_at": _utc_now(),
            "session_id": record.session_id,
            "tab": record.tab,
            "rating": record.rating,
            "reasons": json.dumps(list(record.reasons)),
            "comment": redact_secrets(record.comment),
            "better_answer": redact_secrets(record.better_answer),
            "messages": redact_secrets(json.dumps(record.messages, ensure_ascii=False)),
            "inputs": redact_secrets(json.dumps(record.inputs, ensure_ascii=False)),
            "response": redact_secrets(record.response),
            "model_id": record.model_id,
            "params": json.dumps(record.params),
            "app_version": record.app_version,
            "submission_id": record.submission_id,
        }
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._conn.execute(
                    f"INSERT INTO feedback ({names}) VALUES ({marks}) ON CONFLICT (submission_id) DO NOTHING", row
                )
                if cursor.rowcount == 1:
                    row_id = cursor.lastrowid
                else:  # already stored by an earlier attempt of the same submission
                    row_id = self._conn.execute(
                        "SELECT id FROM feedback WHERE submission_id = ?", (record.submission_id,)
                    ).fetchone()[0]
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return int(row_id)

    # ----------------------------------------------------------------------------------- read
    def _reader(self) -> sqlite3.Connection:
        return connect(self.path)

    def count(self) -> int:
        with _closing(self._reader()) as conn:
            return conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def rows(self, min_rating: int | None = None, limit: int | None = None, newest_first: bool = False) -> list[dict]:
        return list(iter_rows(self.path, min_rating=min_rating, limit=limit, newest_first=newest_first))

    def summary(self) -> dict[str, list[tuple[str, int]]]:
        """Counts by rating, by reason and by model (for the overview tab)."""
        with _closing(self._reader()) as conn:
            by_rating = conn.execute(
                "SELECT CASE rating WHEN 1 THEN 'up' ELSE 'down' END, COUNT(*) FROM feedback GROUP BY rating"
                " ORDER BY rating DESC"
            ).fetchall()
            by_reason = conn.execute(
                "SELECT j.value, COUNT(*) FROM feedback, json_each(feedback.reasons) AS j"
                " GROUP BY j.value ORDER BY COUNT(*) DESC, j.value"
            ).fetchall()
            by_model = conn.execute(
                "SELECT model_id, SUM(rating = 1), SUM(rating = -1), COUNT(*) FROM feedback"
                " GROUP BY model_id ORDER BY COUNT(*) DESC"
            ).fetchall()
        return {
            "rating": [tuple(r) for r in by_rating],
            "reason": [tuple(r) for r in by_reason],
            "model": [tuple(r) for r in by_model],
        }


class _closing:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.close()


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    item = dict(row)
    for name in JSON_COLUMNS:
        item[name] = json.loads(item[name])
    return item


def iter_rows(
    db_path: str | Path, min_rating: int | None = None, limit: int | None = None, newest_first: bool = False
) -> Iterator[dict[str, Any]]:
    """Rows as dicts with JSON columns decoded, oldest first (newest first for the overview)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise UserError(f"{db_path}: feedback database not found")
    query = "SELECT * FROM feedback"
    args: list[Any] = []
    if min_rating is not None:
        query += " WHERE rating >= ?"
        args.append(min_rating)
    query += " ORDER BY id DESC" if newest_first else " ORDER BY id"
    if limit is not None:
        query += " LIMIT ?"
        args.append(limit)
    try:
        with _closing(connect(db_path)) as conn:
            for row in conn.execute(query, args):
                yield _decode(row)
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{db_path}: cannot read the feedback database ({exc})") from None


# -------------------------------------------------------------------------------------- export
def _conversation(row: dict[str, Any], answer: str) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]] + [
        {"role": "assistant", "content": answer}
    ]


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
    prompt = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": better}],
        "rejected": [{"role": "assistant", "content": row["response"]}],
    }


def export_records(rows: Iterable[dict[str, Any]], fmt: str) -> Iterator[dict[str, Any]]:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format: choose one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    convert = {"sft": sft_record, "dpo": dpo_record, "jsonl": lambda row: row}[fmt]
    for row in rows:
        record = convert(row)
        if record is not None:
            yield record


def write_jsonl(records: Iterable[dict[str, Any]], out_path: str | Path) -> int:
    """Write atomically (temp file + rename) so a half-written export is never picked up by `data prepare`."""
    count = 0
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def export_feedback(db_path: str | Path, out_path: str | Path, fmt: str, min_rating: int | None = None) -> int:
    """`tunelab feedback export`: rows -> sft / dpo / jsonl file. Returns the number of records written."""
    if not Path(db_path).is_file():
        raise UserError(f"{db_path}: feedback database not found")
    return write_jsonl(export_records(iter_rows(db_path, min_rating=min_rating), fmt), out_path)


def rows_to_csv(rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS else v) for k, v in row.items()})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ is a formula in spreadsheet apps; user text must stay text there.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value
