"""Durable feedback storage (SQLite) and its conversion into the next round of training data.

Storage contract
- Table `feedback` (one rated answer) and table `pairwise` (a side-by-side pick between two answers to the same
  prompt), explicit columns (see `MIGRATIONS`); the schema version is `PRAGMA user_version`. Every row names the
  model that produced each answer (`model_id`) and its weights' sha256 (`model_hash`, see serve/fingerprint.py);
  rows written before schema v2 keep `model_hash` NULL.
- WAL journal + `synchronous=FULL`: a row is on disk when `FeedbackStore.add` returns, so the app only
  acknowledges a submission after its transaction committed (a SIGKILL right after loses nothing).
- One write connection shared behind a lock (writes are tiny; the lock keeps one transaction per write and
  avoids SQLITE_BUSY between the app's worker threads); readers open their own short-lived connections.
  `busy_timeout` covers other processes (e.g. `tunelab feedback export` while the app runs).

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
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import UserError
from tunelab.io import write_jsonl
from tunelab.serve.evalset import frozen_prompt_keys, prompt_key

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
EXPORT_FORMATS = ("sft", "dpo", "kto", "jsonl", "evalset")
PICKS = ("a", "b", "both_bad")

# Server-side limits on what one submission may store (the UI enforces the same, but the API is public).
MAX_COMMENT_CHARS = 2_000
MAX_BETTER_ANSWER_CHARS = 8_000

SCHEMA_V1 = """
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

SCHEMA_V2 = """
ALTER TABLE feedback ADD COLUMN model_hash TEXT;         -- sha256 of the weights (NULL: stored before v2)
CREATE TABLE IF NOT EXISTS pairwise (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    TEXT    NOT NULL,
    session_id    TEXT    NOT NULL,
    tab           TEXT    NOT NULL CHECK (tab IN ('chat', 'planner')),
    messages      TEXT    NOT NULL,                       -- JSON: conversation both answers continue
    inputs        TEXT    NOT NULL DEFAULT '{}',
    answer_a      TEXT    NOT NULL,
    answer_b      TEXT    NOT NULL,
    model_a_id    TEXT    NOT NULL,
    model_a_hash  TEXT,
    model_b_id    TEXT    NOT NULL,
    model_b_hash  TEXT,
    params_a      TEXT    NOT NULL DEFAULT '{}',          -- JSON: generation parameters (seed included)
    params_b      TEXT    NOT NULL DEFAULT '{}',
    pick          TEXT    NOT NULL CHECK (pick IN ('a', 'b', 'both_bad')),
    reasons       TEXT    NOT NULL DEFAULT '[]',
    comment       TEXT    NOT NULL DEFAULT '',
    app_version   TEXT    NOT NULL,
    submission_id TEXT    UNIQUE
);
CREATE INDEX IF NOT EXISTS pairwise_created_at ON pairwise (created_at);
"""

# MIGRATIONS[v] takes a database at schema v-1 to schema v (v0 = empty file).
MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2}

JSON_COLUMNS = ("reasons", "messages", "inputs", "params")
COLUMNS = (
    "id", "created_at", "session_id", "tab", "rating", "reasons", "comment", "better_answer",
    "messages", "inputs", "response", "model_id", "params", "app_version", "submission_id", "model_hash",
)  # fmt: skip
PAIRWISE_JSON_COLUMNS = ("messages", "inputs", "params_a", "params_b", "reasons")

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
    model_hash: str | None = None  # sha256 of the model's weights files (serve/fingerprint.py)

    def validate(self) -> FeedbackRecord:
        if self.tab not in TABS:
            raise UserError(f"feedback: unknown tab {self.tab!r}")
        if self.rating not in (-1, 1):
            raise UserError(f"feedback: rating must be +1 or -1 (got {self.rating!r})")
        if len(self.better_answer) > MAX_BETTER_ANSWER_CHARS:
            raise UserError(f"feedback: the better answer is longer than {MAX_BETTER_ANSWER_CHARS} characters")
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


@dataclass
class PairwiseRecord:
    """A side-by-side pick: two answers to the same conversation, which one is better (or both bad), and why."""

    tab: Literal["chat", "planner"]
    messages: list[dict[str, str]]  # what both models saw, without the answers
    answer_a: str
    answer_b: str
    model_a_id: str
    model_b_id: str
    pick: Literal["a", "b", "both_bad"]
    app_version: str
    session_id: str
    model_a_hash: str | None = None
    model_b_hash: str | None = None
    params_a: dict[str, Any] = field(default_factory=dict)
    params_b: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    comment: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    submission_id: str | None = None

    def validate(self) -> PairwiseRecord:
        if self.tab not in TABS:
            raise UserError(f"feedback: unknown tab {self.tab!r}")
        if self.pick not in PICKS:
            raise UserError(f"feedback: pick must be one of {list(PICKS)} (got {self.pick!r})")
        if not self.answer_a.strip() or not self.answer_b.strip():
            raise UserError("feedback: a side-by-side pick needs both answers")
        _check_common(self.reasons, self.comment, self.submission_id)
        return self


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
                # Statement by statement: executescript() would commit on its own, outside this transaction,
                # so a failed step leaves the database at its old version, untouched.
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _statements(MIGRATIONS[step]):
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
            "model_hash": record.model_hash,
        }
        return self._insert("feedback", row)

    def add_pairwise(self, record: PairwiseRecord) -> int:
        """Insert one side-by-side pick (durable on return; idempotent per submission_id, like `add`)."""
        record.validate()
        row = {
            "created_at": _utc_now(),
            "session_id": record.session_id,
            "tab": record.tab,
            "messages": redact_secrets(json.dumps(record.messages, ensure_ascii=False)),
            "inputs": redact_secrets(json.dumps(record.inputs, ensure_ascii=False)),
            "answer_a": redact_secrets(record.answer_a),
            "answer_b": redact_secrets(record.answer_b),
            "model_a_id": record.model_a_id,
            "model_a_hash": record.model_a_hash,
            "model_b_id": record.model_b_id,
            "model_b_hash": record.model_b_hash,
            "params_a": json.dumps(record.params_a),
            "params_b": json.dumps(record.params_b),
            "pick": record.pick,
            "reasons": json.dumps(list(record.reasons)),
            "comment": redact_secrets(record.comment),
            "app_version": record.app_version,
            "submission_id": record.submission_id,
        }
        return self._insert("pairwise", row)

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._conn.execute(
                    f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT (submission_id) DO NOTHING", row
                )
                if cursor.rowcount == 1:
                    row_id = cursor.lastrowid
                else:  # already stored by an earlier attempt of the same submission
                    row_id = self._conn.execute(
                        f"SELECT id FROM {table} WHERE submission_id = ?", (row["submission_id"],)
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

    def pairwise_count(self) -> int:
        with _closing(self._reader()) as conn:
            return conn.execute("SELECT COUNT(*) FROM pairwise").fetchone()[0]

    def pairwise_rows(self) -> list[dict]:
        return list(iter_pairwise_rows(self.path))

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


def _statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        code = "\n".join(line.split("--")[0] for line in statement.splitlines()).strip()
        if code:
            yield code


def _decode(row: sqlite3.Row, json_columns: tuple[str, ...] = JSON_COLUMNS) -> dict[str, Any]:
    item = dict(row)
    for name in json_columns:
        item[name] = json.loads(item[name])
    return item


def iter_pairwise_rows(db_path: str | Path) -> Iterator[dict[str, Any]]:
    """Side-by-side picks as dicts with JSON columns decoded, oldest first (none in a schema-v1 file)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise UserError(f"{db_path}: feedback database not found")
    try:
        with _closing(connect(db_path)) as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] < 2:
                return
            for row in conn.execute("SELECT * FROM pairwise ORDER BY id"):
                yield _decode(row, PAIRWISE_JSON_COLUMNS)
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{db_path}: cannot read the feedback database ({exc})") from None


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


def _prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


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


TRAINING_FORMATS = ("sft", "dpo", "kto")  # formats that feed `tunelab train`: frozen regression prompts stay out


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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: _csv_cell(json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ is a formula in spreadsheet apps; user text must stay text there.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value
