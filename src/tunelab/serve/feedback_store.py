"""Durable feedback storage (SQLite): the two record types, their tables, the migrations and the readers.

Storage contract
- Table `feedback` (one rated answer, `FeedbackRecord`) and table `pairwise` (a side-by-side pick between two
  answers to the same prompt, `PairwiseRecord`). Each record field is a column, declared once with `column()`:
  the migrations, the insert and the readers all read that declaration. Every row also has `id` and `created_at`.
  The schema version is `PRAGMA user_version`. Every row names the model that produced each answer (`model_id`) and
  its weights' sha256 (`model_hash`, see serve/fingerprint.py); rows written before schema v2 keep `model_hash` NULL.
- WAL journal + `synchronous=FULL`: a row is on disk when `FeedbackStore.add` returns, so the app only
  acknowledges a submission after its transaction committed (a SIGKILL right after loses nothing).
- One write connection shared behind a lock (writes are tiny; the lock keeps one transaction per write and
  avoids SQLITE_BUSY between the app's worker threads); readers open their own short-lived connections.
  `busy_timeout` covers other processes (e.g. `tunelab feedback export` while the app runs).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import MISSING, Field, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import UserError

SCHEMA_VERSION = 2

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
# A side-by-side pick as stored, and how the app labels it.
PICKS = {"a": "⬅️ A is better", "b": "B is better ➡️", "both_bad": "👎 Both bad"}

# Server-side limits on what one submission may store (the UI enforces the same, but the API is public).
MAX_COMMENT_CHARS = 2_000
MAX_BETTER_ANSWER_CHARS = 8_000

# Hugging Face tokens look like `hf_` + 30+ letters/digits. People paste them into comment boxes by accident;
# they must never reach the database (which may itself be pushed to the Hub).
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def redact_secrets(text: str) -> str:
    return _HF_TOKEN.sub("[redacted token]", text)


def canonical_reasons(reasons: Iterable[str] | None) -> list[str]:
    """The chosen reasons in REASONS order; unknown values are dropped."""
    chosen = set(reasons or [])
    return [reason for reason in REASONS if reason in chosen]


def column(
    sql: str, *, since: int = 1, as_json: bool = False, free_text: bool = False, default: Any = MISSING, **kwargs
) -> Any:
    """A record field that is also a table column. `sql`: its type and constraints; `since`: the schema version that
    added it; `as_json`: stored as JSON text and decoded by the readers; `free_text`: typed by a person or generated
    by a model, so secrets are redacted before storage."""
    metadata = {"sql": sql, "since": since, "as_json": as_json, "free_text": free_text}
    return field(default=default, metadata=metadata, **kwargs)


# Columns the store fills in, first in every table.
ROW_COLUMNS = (("id", "INTEGER PRIMARY KEY AUTOINCREMENT"), ("created_at", "TEXT NOT NULL"))  # created_at: ISO, UTC
_TAB_SQL = "TEXT NOT NULL CHECK (tab IN ('chat', 'planner'))"


@dataclass(kw_only=True)
class FeedbackRecord:
    """One rated answer, with everything needed to reproduce it and to learn from it (fields in table order)."""

    session_id: str = column("TEXT NOT NULL")  # anonymous, random per browser session
    tab: Literal["chat", "planner"] = column(_TAB_SQL)
    rating: int = column("INTEGER NOT NULL CHECK (rating IN (-1, 1))")  # +1 thumbs up, -1 thumbs down
    reasons: list[str] = column("TEXT NOT NULL DEFAULT '[]'", as_json=True, default_factory=list)
    comment: str = column("TEXT NOT NULL DEFAULT ''", free_text=True, default="")
    better_answer: str = column("TEXT NOT NULL DEFAULT ''", free_text=True, default="")
    # what the model saw (system + history + user), without the answer
    messages: list[dict[str, str]] = column("TEXT NOT NULL", as_json=True, free_text=True)
    # the chat message + system prompt, or the planner form
    inputs: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", as_json=True, free_text=True, default_factory=dict)
    response: str = column("TEXT NOT NULL", free_text=True)  # the full answer that was rated
    model_id: str = column("TEXT NOT NULL")
    params: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", as_json=True, default_factory=dict)
    app_version: str = column("TEXT NOT NULL")
    # idempotency key chosen by the client (e.g. a UUID): a retried submit is stored once
    submission_id: str | None = column("TEXT UNIQUE", default=None)
    # sha256 of the model's weights files (serve/fingerprint.py); NULL in rows stored before v2
    model_hash: str | None = column("TEXT", since=2, default=None)

    def validate(self) -> FeedbackRecord:
        if self.tab not in TABS:
            raise UserError(f"feedback: unknown tab {self.tab!r}")
        if self.rating not in (-1, 1):
            raise UserError(f"feedback: rating must be +1 or -1 (got {self.rating!r})")
        if len(self.better_answer) > MAX_BETTER_ANSWER_CHARS:
            raise UserError(f"feedback: the better answer is longer than {MAX_BETTER_ANSWER_CHARS} characters")
        _check_common(self.reasons, self.comment, self.submission_id)
        return self


@dataclass(kw_only=True)
class PairwiseRecord:
    """A side-by-side pick: two answers to the same conversation, which one is better (or both bad), and why
    (fields in table order)."""

    session_id: str = column("TEXT NOT NULL")
    tab: Literal["chat", "planner"] = column(_TAB_SQL)
    messages: list[dict[str, str]] = column("TEXT NOT NULL", as_json=True, free_text=True)  # without the answers
    inputs: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", as_json=True, free_text=True, default_factory=dict)
    answer_a: str = column("TEXT NOT NULL", free_text=True)
    answer_b: str = column("TEXT NOT NULL", free_text=True)
    model_a_id: str = column("TEXT NOT NULL")
    model_a_hash: str | None = column("TEXT", default=None)
    model_b_id: str = column("TEXT NOT NULL")
    model_b_hash: str | None = column("TEXT", default=None)
    # generation parameters, seed included
    params_a: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", as_json=True, default_factory=dict)
    params_b: dict[str, Any] = column("TEXT NOT NULL DEFAULT '{}'", as_json=True, default_factory=dict)
    pick: Literal["a", "b", "both_bad"] = column("TEXT NOT NULL CHECK (pick IN ('a', 'b', 'both_bad'))")
    reasons: list[str] = column("TEXT NOT NULL DEFAULT '[]'", as_json=True, default_factory=list)
    comment: str = column("TEXT NOT NULL DEFAULT ''", free_text=True, default="")
    app_version: str = column("TEXT NOT NULL")
    submission_id: str | None = column("TEXT UNIQUE", default=None)

    def validate(self) -> PairwiseRecord:
        if self.tab not in TABS:
            raise UserError(f"feedback: unknown tab {self.tab!r}")
        if self.pick not in PICKS:
            raise UserError(f"feedback: pick must be one of {list(PICKS)} (got {self.pick!r})")
        if not self.answer_a.strip() or not self.answer_b.strip():
            raise UserError("feedback: a side-by-side pick needs both answers")
        _check_common(self.reasons, self.comment, self.submission_id)
        return self


def _check_common(reasons: list[str], comment: str, submission_id: str | None) -> None:
    unknown = [r for r in reasons if r not in REASONS]
    if unknown:
        raise UserError(f"feedback: unknown reason(s) {unknown}; choose from {list(REASONS)}")
    if len(comment) > MAX_COMMENT_CHARS:
        raise UserError(f"feedback: the comment is longer than {MAX_COMMENT_CHARS} characters")
    if submission_id is not None and not _SUBMISSION_ID.fullmatch(submission_id):
        raise UserError("feedback: submission_id must be 1-64 letters, digits, '-' or '_'")


@dataclass(frozen=True)
class Table:
    """One table: `ROW_COLUMNS`, then the fields of `record` (see `column`); created by schema version `since`."""

    name: str
    record: type
    since: int

    @property
    def fields(self) -> tuple[Field, ...]:
        return fields(self.record)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in ROW_COLUMNS) + tuple(f.name for f in self.fields)

    @property
    def json_columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.metadata["as_json"])

    def migration(self, version: int) -> list[str]:
        """The statements that take this table from schema `version - 1` to `version`."""
        if version == self.since:
            added = [f"{f.name} {f.metadata['sql']}" for f in self.fields if f.metadata["since"] <= version]
            definitions = ", ".join([f"{name} {sql}" for name, sql in ROW_COLUMNS] + added)
            return [
                f"CREATE TABLE IF NOT EXISTS {self.name} ({definitions})",
                f"CREATE INDEX IF NOT EXISTS {self.name}_created_at ON {self.name} (created_at)",
            ]
        if version < self.since:
            return []
        return [
            f"ALTER TABLE {self.name} ADD COLUMN {f.name} {f.metadata['sql']}"
            for f in self.fields
            if f.metadata["since"] == version
        ]

    def row(self, record: Any) -> dict[str, Any]:
        """The record as column values to insert (JSON encoded, secrets redacted from free text)."""
        row: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        for f in self.fields:
            value = getattr(record, f.name)
            if f.metadata["as_json"]:
                value = json.dumps(value, ensure_ascii=False)
            row[f.name] = redact_secrets(value) if f.metadata["free_text"] else value
        return row

    def decode(self, row: sqlite3.Row) -> dict[str, Any]:
        item = dict(row)
        for name in self.json_columns:
            item[name] = json.loads(item[name])
        return item


FEEDBACK = Table("feedback", FeedbackRecord, since=1)
PAIRWISE = Table("pairwise", PairwiseRecord, since=2)
TABLES = (FEEDBACK, PAIRWISE)


def migration(version: int) -> list[str]:
    """The statements that take a database from schema `version - 1` to `version` (v0 = an empty file)."""
    return [statement for table in TABLES for statement in table.migration(version)]


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
                f"{self.path}: feedback schema v{version} is newer than this tunelab (v{SCHEMA_VERSION}); "
                "upgrade tunelab"
            )
        if version < SCHEMA_VERSION:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # Statement by statement: executescript() would commit on its own, outside this transaction,
                # so a failed step leaves the database at its old version, untouched.
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in migration(step):
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
        return self._insert(FEEDBACK, record.validate())

    def add_pairwise(self, record: PairwiseRecord) -> int:
        """Insert one side-by-side pick (durable on return; idempotent per submission_id, like `add`)."""
        return self._insert(PAIRWISE, record.validate())

    def _insert(self, table: Table, record: Any) -> int:
        row = table.row(record)
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._conn.execute(
                    f"INSERT INTO {table.name} ({names}) VALUES ({marks}) ON CONFLICT (submission_id) DO NOTHING", row
                )
                if cursor.rowcount == 1:
                    row_id = cursor.lastrowid
                else:  # already stored by an earlier attempt of the same submission
                    row_id = self._conn.execute(
                        f"SELECT id FROM {table.name} WHERE submission_id = ?", (row["submission_id"],)
                    ).fetchone()[0]
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return int(row_id)

    # ----------------------------------------------------------------------------------- read
    def count(self) -> int:
        with closing(connect(self.path)) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {FEEDBACK.name}").fetchone()[0]

    def rows(self, min_rating: int | None = None, limit: int | None = None, newest_first: bool = False) -> list[dict]:
        return list(iter_rows(self.path, min_rating=min_rating, limit=limit, newest_first=newest_first))

    def pairwise_count(self) -> int:
        with closing(connect(self.path)) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {PAIRWISE.name}").fetchone()[0]

    def pairwise_rows(self) -> list[dict]:
        return list(iter_pairwise_rows(self.path))

    def summary(self) -> dict[str, list[tuple[str, int]]]:
        """Counts by rating, by reason and by model (for the overview tab)."""
        with closing(connect(self.path)) as conn:
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


def _read(db_path: str | Path, table: Table, query: str, args: Iterable[Any] = ()) -> Iterator[dict[str, Any]]:
    """Rows of `query` on `table`, decoded; a missing or unreadable file is a UserError naming it."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise UserError(f"{db_path}: feedback database not found")
    try:
        with closing(connect(db_path)) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if table.since > FEEDBACK.since and version < table.since:  # a file from before the table: no rows yet
                return
            for row in conn.execute(query, list(args)):
                yield table.decode(row)
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{db_path}: cannot read the feedback database ({exc})") from None


def iter_pairwise_rows(db_path: str | Path) -> Iterator[dict[str, Any]]:
    """Side-by-side picks as dicts with JSON columns decoded, oldest first (none in a schema-v1 file)."""
    return _read(db_path, PAIRWISE, f"SELECT * FROM {PAIRWISE.name} ORDER BY id")


def iter_rows(
    db_path: str | Path, min_rating: int | None = None, limit: int | None = None, newest_first: bool = False
) -> Iterator[dict[str, Any]]:
    """Rows as dicts with JSON columns decoded, oldest first (newest first for the overview)."""
    query = f"SELECT * FROM {FEEDBACK.name}"
    args: list[Any] = []
    if min_rating is not None:
        query += " WHERE rating >= ?"
        args.append(min_rating)
    query += " ORDER BY id DESC" if newest_first else " ORDER BY id"
    if limit is not None:
        query += " LIMIT ?"
        args.append(limit)
    return _read(db_path, FEEDBACK, query, args)
