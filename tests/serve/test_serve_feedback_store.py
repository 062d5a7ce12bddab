"""The SQLite feedback store and the feedback -> dataset conversions (no server, no model)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading

import pytest

from tunelab.errors import UserError
from tunelab.serve.feedback_export import dpo_record, export_feedback, export_records, rows_to_csv, sft_record
from tunelab.serve.feedback_store import SCHEMA_VERSION, FeedbackRecord, FeedbackStore, iter_rows

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Best museum in Lisbon?"}]


def record(**overrides) -> FeedbackRecord:
    values = dict(
        tab="chat",
        rating=1,
        messages=MESSAGES,
        response="The Gulbenkian Museum.",
        model_id="m.gguf",
        app_version="tunelab test",
        session_id="s1",
        params={"temperature": 0.7, "max_new_tokens": 64},
        inputs={"message": "Best museum in Lisbon?"},
    )
    values.update(overrides)
    return FeedbackRecord(**values)


def test_new_database_has_schema_version_and_wal(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    conn = sqlite3.connect(tmp_path / "fb.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [row[1] for row in conn.execute("PRAGMA table_info(feedback)")]
    assert columns[:5] == ["id", "created_at", "session_id", "tab", "rating"]
    assert {"reasons", "comment", "better_answer", "messages", "inputs", "response", "model_id", "params",
            "app_version"} <= set(columns)  # fmt: skip
    store.close()


def test_add_round_trips_every_field(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    rid = store.add(record(rating=-1, reasons=["incorrect", "too long"], comment="meh", better_answer="MAAT."))
    [row] = store.rows()
    assert row["id"] == rid
    assert row["rating"] == -1 and row["reasons"] == ["incorrect", "too long"]
    assert row["comment"] == "meh" and row["better_answer"] == "MAAT."
    assert row["messages"] == MESSAGES and row["response"] == "The Gulbenkian Museum."
    assert row["params"] == {"temperature": 0.7, "max_new_tokens": 64}
    assert row["inputs"] == {"message": "Best museum in Lisbon?"}
    assert row["model_id"] == "m.gguf" and row["app_version"] == "tunelab test" and row["session_id"] == "s1"
    assert row["created_at"].endswith("+00:00")


def test_reopening_keeps_rows_and_newer_schema_is_refused(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).add(record())
    assert FeedbackStore(path).count() == 1
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(UserError, match="newer than this tunelab"):
        FeedbackStore(path)


def test_not_a_database_is_a_user_error(tmp_path):
    path = tmp_path / "fb.db"
    path.write_text("this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a usable feedback database"):
        FeedbackStore(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rating": 0}, "rating"),
        ({"reasons": ["boring"]}, "unknown reason"),
        ({"tab": "admin"}, "unknown tab"),
        ({"comment": "x" * 2001}, "comment is longer"),
    ],
)
def test_invalid_records_are_rejected_and_not_stored(tmp_path, overrides, message):
    store = FeedbackStore(tmp_path / "fb.db")
    with pytest.raises(UserError, match=message):
        store.add(record(**overrides))
    assert store.count() == 0


def test_hf_tokens_are_redacted_before_storage(tmp_path):
    token = "hf_" + "Ab3" * 12
    store = FeedbackStore(tmp_path / "fb.db")
    store.add(record(comment=f"my token is {token}", response=f"echo {token}", better_answer=token))
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # db + WAL
    assert token.encode() not in raw
    assert "[redacted token]" in FeedbackStore(tmp_path / "fb.db").rows()[0]["comment"]


def test_concurrent_writers_lose_nothing(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    ids: list[int] = []
    lock = threading.Lock()

    def write(worker: int) -> None:
        for i in range(25):
            rid = store.add(record(comment=f"w{worker}-{i}"))
            with lock:
                ids.append(rid)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    comments = [row["comment"] for row in store.rows()]
    assert len(comments) == 200 and len(set(comments)) == 200
    assert sorted(ids) == [row["id"] for row in store.rows()]


def test_a_retried_submission_is_stored_once(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    first = store.add(record(submission_id="b9f1-retry", comment="first try"))
    again = store.add(record(submission_id="b9f1-retry", comment="second try"))
    other = store.add(record(comment="no key"))
    other2 = store.add(record(comment="no key"))  # without a key every submit is a new row
    assert first == again and len({first, other, other2}) == 3
    assert [r["comment"] for r in store.rows()] == ["first try", "no key", "no key"]
    with pytest.raises(UserError, match="submission_id"):
        store.add(record(submission_id="x" * 65))


def test_summary_counts_by_rating_reason_and_model(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.add(record(rating=1))
    store.add(record(rating=-1, reasons=["incorrect", "too long"]))
    store.add(record(rating=-1, reasons=["incorrect"], model_id="other.gguf"))
    summary = store.summary()
    assert summary["rating"] == [("up", 1), ("down", 2)]
    assert summary["reason"] == [("incorrect", 2), ("too long", 1)]
    assert summary["model"] == [("m.gguf", 1, 1, 2), ("other.gguf", 0, 1, 1)]


# ------------------------------------------------------------------------------------- export
def stored_rows(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.add(record(rating=1, response="Good answer."))  # -> sft as is
    store.add(record(rating=-1, response="Wrong answer.", better_answer="Corrected answer."))  # -> sft + dpo
    store.add(record(rating=-1, response="Bad, no correction."))  # -> nothing
    store.add(record(rating=1, response="Fine.", better_answer="Even better."))  # -> sft (correction)
    return store


def test_sft_uses_thumbs_up_answers_and_corrections(tmp_path):
    store = stored_rows(tmp_path)
    out = list(export_records(store.rows(), "sft"))
    answers = [r["messages"][-1] for r in out]
    assert answers == [
        {"role": "assistant", "content": "Good answer."},
        {"role": "assistant", "content": "Corrected answer."},
        {"role": "assistant", "content": "Even better."},
    ]
    assert all(r["messages"][:-1] == MESSAGES for r in out)
    assert set(out[0]) == {"messages"}


def test_dpo_pairs_come_from_thumbs_down_with_better_answer(tmp_path):
    store = stored_rows(tmp_path)
    out = list(export_records(store.rows(), "dpo"))
    assert out == [
        {
            "prompt": MESSAGES,
            "chosen": [{"role": "assistant", "content": "Corrected answer."}],
            "rejected": [{"role": "assistant", "content": "Wrong answer."}],
        }
    ]


def test_min_rating_filters_rows(tmp_path):
    stored_rows(tmp_path)
    db = tmp_path / "fb.db"
    assert [r["rating"] for r in iter_rows(db, min_rating=1)] == [1, 1]
    assert export_feedback(db, tmp_path / "sft.jsonl", "sft", min_rating=1) == 2
    assert export_feedback(db, tmp_path / "all.jsonl", "jsonl") == 4
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["better_answer"] == "Corrected answer."


def test_export_of_missing_db_is_a_user_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        export_feedback(tmp_path / "missing.db", tmp_path / "out.jsonl", "sft")
    assert list(tmp_path.iterdir()) == []


def test_single_conversions_skip_unusable_rows():
    row = {"messages": MESSAGES, "rating": -1, "response": "x", "better_answer": "  "}
    assert sft_record(row) is None and dpo_record(row) is None
    assert dpo_record({**row, "better_answer": "x"}) is None  # chosen == rejected teaches nothing


def test_csv_download_neutralises_spreadsheet_formulas(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.add(record(comment='=HYPERLINK("http://evil")', response="plain"))
    parsed = list(csv.DictReader(io.StringIO(rows_to_csv(store.rows()))))
    assert parsed[0]["comment"].startswith("'=")
    assert parsed[0]["response"] == "plain"
    assert json.loads(parsed[0]["messages"]) == MESSAGES
