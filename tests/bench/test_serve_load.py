"""`tunelab bench serve` in small: 5 concurrent users against a real app on the embedded GGUF, one chat and one
plan each, every feedback row confirmed to a user is in the database; plus the percentile it reports."""

from __future__ import annotations

import sqlite3

import pytest

from tunelab.bench.serve_load import Answer, LoadResult, logged_slots, percentile, run_serve_load
from tunelab.errors import UserError


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 50) == 10.0  # rank ceil(0.5 * 20) = 10
    assert percentile(values, 95) == 19.0  # rank ceil(0.95 * 20) = 19
    assert percentile(values, 100) == 20.0 and percentile(values, 1) == 1.0
    assert percentile([3.0], 95) == 3.0


def test_summary_rates_use_decode_time_after_the_first_token():
    result = LoadResult(users=1, rounds=1, max_new_tokens=8, threads=1, wall_s=10.0)
    result.answers = [Answer("chat", 0, ttft_s=1.0, total_s=3.0, submission_id="a", tokens=8),
                      Answer("planner", 0, ttft_s=2.0, total_s=6.0, submission_id="b", tokens=8)]  # fmt: skip
    summary = result.summary()
    assert summary["decode_tok_s_p50"] == 2.0  # sorted rates [2.0, 4.0], nearest rank 1
    assert summary["aggregate_tok_s"] == 1.6  # 16 tokens / 10 s


def test_parallel_is_checked_before_any_app_starts_and_slots_come_from_the_app_log(tmp_path):
    from tests.helpers import embedded_gguf

    with pytest.raises(UserError, match="--parallel: must be >= 1"):
        run_serve_load(embedded_gguf(), parallel=0, workdir=tmp_path)
    assert not (tmp_path / "server.log").exists()
    assert logged_slots("model: m.gguf (llama.cpp)\n") is None
    assert logged_slots(">> llama-server: 16 slots, 2 threads, on http://127.0.0.1:5/v1\n") == 16


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_five_users_no_error_no_lost_feedback(tmp_path):
    from tests.helpers import embedded_gguf

    result = run_serve_load(
        embedded_gguf(), users=5, rounds=1, max_new_tokens=16, threads=1, temperature=0.0, workdir=tmp_path
    )  # greedy: the same answers every run
    assert result.errors == []
    assert len(result.answers) == 10 and {a.tab for a in result.answers} == {"chat", "planner"}
    assert result.feedback_submitted == result.feedback_stored == 10
    conn = sqlite3.connect(tmp_path / "feedback.db")
    stored = {row[0] for row in conn.execute("SELECT submission_id FROM feedback")}
    conn.close()
    assert stored == {a.submission_id for a in result.answers}
    assert all(a.tokens > 0 and a.ttft_s <= a.total_s for a in result.answers)
