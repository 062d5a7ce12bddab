"""Closing the loop: app feedback -> `tunelab feedback export --format sft` -> the next `tunelab train`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import small_llama_folder
from tunelab.serve.feedback_store import FeedbackRecord, FeedbackStore

pytestmark = pytest.mark.slow


def test_exported_feedback_trains_the_next_round(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    for i in range(24):
        question = [{"role": "user", "content": f"Plan one day in city number {i}."}]
        good = i % 3 != 0
        store.add(
            FeedbackRecord(
                tab="chat",
                rating=1 if good else -1,
                messages=question,
                response=f"Morning museum, evening food market {i}.",
                model_id="test",
                app_version="test",
                session_id="s",
                reasons=[] if good else ["incorrect"],
                better_answer="" if good else f"Start at the old town of city {i}, then the river walk.",
            )
        )
    sft = tmp_path / "round2.jsonl"
    cli = [sys.executable, "-m", "tunelab.cli"]
    exported = subprocess.run(
        [*cli, "feedback", "export", str(tmp_path / "feedback.db"), "--format", "sft", "-o", str(sft)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in sft.read_text().splitlines()]
    assert len(records) == 24  # 16 thumbs-up answers + 8 corrected answers
    assert any("old town" in r["messages"][-1]["content"] for r in records)

    config = tmp_path / "round2.yaml"
    config.write_text(f"""
model: {{name: {small_llama_folder(tmp_path)}}}
data: {{sources: [{{path: {sft}}}], val_fraction: 0.2, dedup: {{near: false}}, output_dir: {tmp_path / "prepared"}}}
train: {{output_dir: {tmp_path / "run"}, max_steps: 2, batch_size: 2, max_seq_len: 128, precision: fp32, \
save_steps: 2, eval_steps: 2}}
""")
    trained = subprocess.run([*cli, "train", str(config)], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_rows"] + summary["val_rows"] == 24 and summary["steps"] == 2
