"""Schema v2 of the feedback store (model hashes, side-by-side picks), the DPO/KTO exports and the frozen
regression set (`--format evalset`) that training exports leave out. No server, no model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3

import pytest
from typer.testing import CliRunner

from tunelab.cli import app as cli_app
from tunelab.errors import UserError
from tunelab.serve.evalset import content_version, read_evalset
from tunelab.serve.feedback_export import export_feedback
from tunelab.serve.feedback_store import SCHEMA_VERSION, FeedbackRecord, FeedbackStore, PairwiseRecord
from tunelab.serve.fingerprint import model_fingerprint

SYSTEM = {"role": "system", "content": "Be brief."}

# The schema scripts as released (v1, then the v2 migration): databases made by them exist, so the schema that
# feedback_store derives from its record fields must stay equal to them.
HISTORICAL_V1 = """
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

HISTORICAL_V2 = """
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


def ask(text: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": text}]


def thumb(rating: int, question: str, answer: str, better: str = "", **extra) -> FeedbackRecord:
    return FeedbackRecord(
        tab="chat", rating=rating, messages=ask(question), response=answer, better_answer=better,
        model_id="m.gguf", model_hash="sha256:aa", app_version="t", session_id="s", **extra,
    )  # fmt: skip


def pick(question: str, a: str, b: str, choice: str, **extra) -> PairwiseRecord:
    return PairwiseRecord(
        tab="chat", messages=ask(question), answer_a=a, answer_b=b, model_a_id="cur.gguf", model_b_id="cand.gguf",
        model_a_hash="sha256:aa", model_b_hash="sha256:bb", pick=choice, app_version="t", session_id="s",
        params_a={"seed": 1}, params_b={"seed": 2}, **extra,
    )  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- schema
def test_v1_database_is_migrated_and_old_rows_keep_a_null_hash(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(HISTORICAL_V1)
    conn.execute(
        "INSERT INTO feedback (created_at, session_id, tab, rating, messages, response, model_id, app_version)"
        " VALUES ('2026-01-01T00:00:00', 's', 'chat', 1, ?, 'old answer', 'old.gguf', 'v1')",
        (json.dumps(ask("old question")),),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    store = FeedbackStore(db)
    store.add(thumb(1, "new question", "new answer"))
    store.add_pairwise(pick("q", "A", "B", "a"))
    old, new = store.rows()
    assert (old["response"], old["model_hash"]) == ("old answer", None)
    assert (new["response"], new["model_hash"]) == ("new answer", "sha256:aa")
    assert len(store.pairwise_rows()) == 1
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


def schema_of(db) -> dict:
    """Every table's and index's definition (SQL with comments and spacing normalised), columns and indexes."""
    conn = sqlite3.connect(db)
    schema = {}
    for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"):
        sql = " ".join(re.sub(r"--[^\n]*", "", sql or "").split())
        sql = re.sub(r"\s*([(),])\s*", r"\1", sql)
        columns = conn.execute(f"PRAGMA table_xinfo({name})").fetchall() if kind == "table" else None
        indexes = conn.execute(f"PRAGMA index_list({name})").fetchall() if kind == "table" else None
        schema[name] = (kind, sql, columns, indexes)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    return {"user_version": version, **schema}


def test_new_and_migrated_databases_have_the_released_schema(tmp_path):
    released = sqlite3.connect(tmp_path / "released.db")
    released.executescript(HISTORICAL_V1)
    released.executescript(HISTORICAL_V2)
    released.execute("PRAGMA user_version = 2")
    released.close()
    old = sqlite3.connect(tmp_path / "v1.db")
    old.executescript(HISTORICAL_V1)
    old.execute("PRAGMA user_version = 1")
    old.close()
    FeedbackStore(tmp_path / "new.db").close()
    FeedbackStore(tmp_path / "v1.db").close()
    expected = schema_of(tmp_path / "released.db")
    assert set(expected) == {"user_version", "feedback", "feedback_created_at", "pairwise", "pairwise_created_at",
                             "sqlite_autoindex_feedback_1", "sqlite_autoindex_pairwise_1",
                             "sqlite_sequence"}  # fmt: skip
    assert schema_of(tmp_path / "new.db") == expected
    assert schema_of(tmp_path / "v1.db") == expected


def test_pairwise_round_trip_idempotency_and_validation(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    first = store.add_pairwise(
        pick("q", "A", "B", "b", reasons=["too long"], comment="B is tighter", submission_id="x1")
    )
    again = store.add_pairwise(pick("q", "A", "B", "b", submission_id="x1"))
    assert first == again
    [row] = store.pairwise_rows()
    assert row["pick"] == "b" and row["reasons"] == ["too long"] and row["comment"] == "B is tighter"
    assert (row["model_a_id"], row["model_a_hash"], row["model_b_id"], row["model_b_hash"]) == (
        "cur.gguf", "sha256:aa", "cand.gguf", "sha256:bb",
    )  # fmt: skip
    assert row["params_a"] == {"seed": 1} and row["messages"] == ask("q")
    with pytest.raises(UserError, match="pick"):
        store.add_pairwise(pick("q", "A", "B", "c"))
    with pytest.raises(UserError, match="both answers"):
        store.add_pairwise(pick("q", "A", " ", "a"))
    with pytest.raises(UserError, match="reason"):
        store.add_pairwise(pick("q", "A", "B", "a", reasons=["boring"]))
    store.close()


# ------------------------------------------------------------------------------------ exports
def test_dpo_export_has_corrections_and_side_by_side_winners(tmp_path):
    db = tmp_path / "fb.db"
    store = FeedbackStore(db)
    store.add(thumb(-1, "q1", "bad", better="good"))
    store.add(thumb(-1, "q2", "bad, no correction"))
    store.add(thumb(1, "q3", "fine"))
    store.add_pairwise(pick("q4", "left", "right", "b"))
    store.add_pairwise(pick("q5", "left", "right", "a"))
    store.add_pairwise(pick("q6", "left", "right", "both_bad"))
    store.close()
    out = tmp_path / "dpo.jsonl"
    assert export_feedback(db, out, "dpo") == 3
    pairs = {
        r["prompt"][-1]["content"]: (r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in read_jsonl(out)
    }
    assert pairs == {"q1": ("good", "bad"), "q4": ("right", "left"), "q5": ("left", "right")}
    assert all(r["prompt"][0] == SYSTEM for r in read_jsonl(out))


def test_kto_export_is_thumbs_with_labels(tmp_path):
    db = tmp_path / "fb.db"
    store = FeedbackStore(db)
    store.add(thumb(1, "q1", "liked"))
    store.add(thumb(-1, "q2", "disliked", better="better"))
    store.add_pairwise(pick("q3", "x", "y", "a"))  # picks are pairs, not thumbs
    store.close()
    out = tmp_path / "kto.jsonl"
    assert export_feedback(db, out, "kto") == 2
    assert [(r["prompt"][-1]["content"], r["completion"], r["label"]) for r in read_jsonl(out)] == [
        ("q1", [{"role": "assistant", "content": "liked"}], True),
        ("q2", [{"role": "assistant", "content": "disliked"}], False),
    ]


# ------------------------------------------------------------------------------ regression set
def fill_for_evalset(db) -> None:
    store = FeedbackStore(db)
    store.add(thumb(1, "liked prompt", "ok"))
    store.add(thumb(-1, "disliked prompt", "meh"))
    store.add(thumb(-1, "corrected prompt", "wrong", better="right"))
    store.add(thumb(1, "Corrected  PROMPT", "dup of the corrected prompt"))  # same prompt: once in the set
    store.add_pairwise(pick("picked prompt", "A", "B", "b"))
    store.add(FeedbackRecord(
        tab="planner", rating=-1, messages=ask("Plan a 2-day trip to Porto."), response="plan", model_id="m",
        app_version="t", session_id="s",
        inputs={"city": "Porto", "days": 2, "interests": ["food", "museums"], "preferences": "no stairs"},
    ))  # fmt: skip
    store.close()


def test_evalset_takes_failures_first_and_is_versioned_by_content(tmp_path):
    db = tmp_path / "fb.db"
    fill_for_evalset(db)
    result = CliRunner().invoke(cli_app, ["feedback", "export", str(db), "--format", "evalset", "--max-prompts", "4"])
    assert result.exit_code == 0, result.output
    [path] = tmp_path.glob("evalset-*.jsonl")
    lines = read_jsonl(path)
    header, records = lines[0]["evalset"], lines[1:]
    assert [r["prompt"] for r in records] == [
        "corrected prompt", "disliked prompt", "Plan a 2-day trip to Porto.", "picked prompt",
    ]  # fmt: skip
    assert records[0]["reference"] == "right" and "reference" not in records[1]
    assert records[3]["reference"] == "B"
    assert {k: records[2][k] for k in ("city", "days", "preferences")} == {
        "city": "Porto", "days": 2, "preferences": ["food", "museums", "no stairs"],
    }  # fmt: skip
    version = hashlib.sha256(
        "\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records).encode()
    ).hexdigest()[:16]
    assert header["version"] == version and path.name == f"evalset-{version}.jsonl"
    assert header["prompts"] == 4 and header["with_reference"] == 2
    assert read_evalset(path).version == version == content_version(records)
    # The same feedback freezes to the same file; a different selection is a new version.
    CliRunner().invoke(cli_app, ["feedback", "export", str(db), "--format", "evalset", "--max-prompts", "4"])
    assert len(list(tmp_path.glob("evalset-*.jsonl"))) == 1
    CliRunner().invoke(cli_app, ["feedback", "export", str(db), "--format", "evalset", "--max-prompts", "2"])
    assert len(list(tmp_path.glob("evalset-*.jsonl"))) == 2


@pytest.mark.parametrize("fmt", ["sft", "dpo", "kto"])
def test_training_exports_leave_out_frozen_prompts(tmp_path, fmt):
    db = tmp_path / "fb.db"
    fill_for_evalset(db)
    before = export_feedback(db, tmp_path / "before.jsonl", fmt)
    assert before > 0
    CliRunner().invoke(cli_app, ["feedback", "export", str(db), "--format", "evalset"])  # freezes every prompt
    notes: list[str] = []
    assert export_feedback(db, tmp_path / "after.jsonl", fmt, log=notes.append) == 0
    assert notes and "frozen regression set" in notes[0]
    # The raw dump is not training data: it keeps everything.
    assert export_feedback(db, tmp_path / "raw.jsonl", "jsonl") == 5


def test_evalset_user_errors(tmp_path):
    db = tmp_path / "fb.db"
    FeedbackStore(db).close()
    runner = CliRunner()
    empty = runner.invoke(cli_app, ["feedback", "export", str(db), "--format", "evalset"])
    assert isinstance(empty.exception, UserError) and "no feedback rows" in str(empty.exception)
    fill_for_evalset(db)
    bad_out = runner.invoke(
        cli_app, ["feedback", "export", str(db), "--format", "evalset", "-o", str(tmp_path / "x.jsonl")]
    )
    assert isinstance(bad_out.exception, UserError) and "folder" in str(bad_out.exception)
    (tmp_path / "evalset-broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"evalset-broken.jsonl:1: not valid JSON"):
        export_feedback(db, tmp_path / "sft.jsonl", "sft")


# -------------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_the_file_sha256_and_follows_changes(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    assert model_fingerprint(gguf) == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    first = model_fingerprint(gguf)
    gguf.write_bytes(b"GGUF" + b"\1" * 999)
    os.utime(gguf, ns=(1, 1))  # a different mtime even on coarse clocks
    assert model_fingerprint(gguf) != first


def test_fingerprint_of_a_run_folder_covers_the_adapter_weights(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights-1")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    expected = hashlib.sha256(b"weights-1").hexdigest()
    assert model_fingerprint(run) == f"sha256:{expected}"
    (run / "adapter" / "extra.bin").write_bytes(b"more")
    two = hashlib.sha256(b"adapter_model.safetensors\0weights-1extra.bin\0more").hexdigest()
    assert model_fingerprint(run) == f"sha256:{two}"
    with pytest.raises(UserError, match="no weights files"):
        model_fingerprint(tmp_path / "empty-folder-that-is-not-there")


def test_tunelab_eval_reads_a_frozen_evalset(tmp_path):
    from tunelab.eval.rubric import load_travel_prompts

    db = tmp_path / "fb.db"
    fill_for_evalset(db)
    CliRunner().invoke(cli_app, ["feedback", "export", str(db), "--format", "evalset"])
    [path] = tmp_path.glob("evalset-*.jsonl")
    prompts = load_travel_prompts(path)
    assert [p.prompt for p in prompts] == [r["prompt"] for r in read_evalset(path).records]
    porto = next(p for p in prompts if p.city)
    assert (porto.city, porto.days, porto.preferences) == ("Porto", 2, ("food", "museums", "no stairs"))
