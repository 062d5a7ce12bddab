"""`tunelab feedback export`: CLI, the SFT round trip into `tunelab data prepare`, and the Hub push."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tunelab.cli import app as cli_app
from tunelab.serve.feedback_store import FeedbackRecord, FeedbackStore

CITIES = ["Lisbon", "Porto", "Madrid", "Seville", "Rome", "Florence", "Vienna", "Prague", "Krakow", "Berlin",
          "Hamburg", "Oslo", "Bergen", "Dublin", "Edinburgh", "Paris", "Lyon", "Nice", "Athens",
          "Istanbul"]  # fmt: skip


def fill(db, n_up: int = 12, n_down_corrected: int = 6, n_down: int = 3) -> None:
    store = FeedbackStore(db)

    def add(i: int, rating: int, better: str = "") -> None:
        city = CITIES[i % len(CITIES)]
        store.add(FeedbackRecord(
            tab="chat", rating=rating, session_id=f"s{i}", model_id="m.gguf", app_version="tunelab test",
            messages=[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Question {i}: what should I eat first in {city}?"}],
            response=f"Answer {i}: in {city}, start with the market hall near the old town and try the local bread.",
            better_answer=better, params={"temperature": 0.7},
        ))  # fmt: skip

    for i in range(n_up):
        add(i, 1)
    for i in range(n_up, n_up + n_down_corrected):
        add(i, -1, better=f"Corrected {i}: ask locals in {CITIES[i % len(CITIES)]} for the best family-run bakery.")
    for i in range(n_up + n_down_corrected, n_up + n_down_corrected + n_down):
        add(i, -1)
    store.close()


def run_cli(*args: str):
    result = CliRunner().invoke(cli_app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_cli_writes_sft_dpo_kto_and_jsonl(tmp_path):
    db = tmp_path / "feedback.db"
    fill(db)
    result = run_cli("feedback", "export", str(db), "--format", "sft")
    assert result.exit_code == 0 and "wrote 18 sft record(s)" in result.output
    sft = [json.loads(line) for line in (tmp_path / "feedback.sft.jsonl").read_text().splitlines()]
    assert len(sft) == 18 and all(set(r) == {"messages"} for r in sft)
    assert sft[-1]["messages"][-1]["content"].startswith("Corrected 17")

    run_cli("feedback", "export", str(db), "-f", "dpo", "-o", str(tmp_path / "pairs.jsonl"))
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert pairs[0]["rejected"][0]["content"].startswith("Answer 12")

    result = run_cli("feedback", "export", str(db), "--format", "kto")
    assert result.exit_code == 0 and "wrote 21 kto record(s)" in result.output
    kto = [json.loads(line) for line in (tmp_path / "feedback.kto.jsonl").read_text().splitlines()]
    assert [r["label"] for r in kto] == [True] * 12 + [False] * 9  # 12 thumbs up, then 9 down (6 corrected)
    assert set(kto[0]) == {"prompt", "completion", "label"} and kto[12]["completion"][0]["content"].startswith(
        "Answer 12"
    )

    run_cli("feedback", "export", str(db), "-f", "sft", "--min-rating", "1", "-o", str(tmp_path / "up.jsonl"))
    assert len((tmp_path / "up.jsonl").read_text().splitlines()) == 12
    run_cli("feedback", "export", str(db), "-f", "jsonl", "-o", str(tmp_path / "all.jsonl"))
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 21


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "xml"], "--format: choose one of sft, dpo, kto, jsonl, evalset"),
        (["--min-rating", "3"], "--min-rating"),
        (["--push-to-hub", "not-a-repo"], "expected a dataset repo id"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args, message):
    db = tmp_path / "feedback.db"
    fill(db, 1, 0, 0)
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "feedback", "export", str(db), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_database_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "feedback", "export", str(tmp_path / "none.db")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "feedback database not found" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sft_export_is_a_data_source_for_data_prepare(tmp_path):
    """The loop closes: feedback -> `tunelab feedback export --format sft` -> `data.sources` -> prepared data."""
    from tunelab.config import config_from_dict
    from tunelab.data.prepare import load_prepared, prepare_dataset

    db = tmp_path / "feedback.db"
    fill(db)
    out = tmp_path / "feedback-sft.jsonl"
    assert run_cli("feedback", "export", str(db), "-f", "sft", "-o", str(out)).exit_code == 0
    exported = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    cfg = config_from_dict({
        "data": {"sources": [{"path": str(out)}], "output_dir": str(tmp_path / "prepared"), "val_fraction": 0.2},
        "train": {"max_seq_len": 256},
    })  # fmt: skip
    train, val = load_prepared(prepare_dataset(cfg))
    prepared = [json.loads(m) for m in list(train["messages"]) + list(val["messages"])]
    assert len(prepared) == len(exported) == 18
    assert sorted(map(json.dumps, prepared)) == sorted(map(json.dumps, exported))
    assert all(n > 0 for n in train["num_label_tokens"])  # the answers are what gets trained


def test_push_to_hub_uploads_to_a_dataset_repo(tmp_path, monkeypatch):
    import huggingface_hub

    from tunelab import hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
            calls["create_repo"] = (repo_id, repo_type, private)
            return f"https://huggingface.co/datasets/{repo_id}"

        def create_commit(self, repo_id, operations, repo_type=None, **kw):
            calls["commit"] = (repo_id, repo_type, [(op.path_in_repo, op.path_or_fileobj) for op in operations])

        def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type=None, **kw):
            calls["commit"] = (repo_id, repo_type, [(path_in_repo, str(path_or_fileobj))])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(hub, "check_hub_reachable", lambda *a, **k: None)
    db = tmp_path / "feedback.db"
    fill(db, 2, 1, 0)
    result = run_cli("feedback", "export", str(db), "-f", "dpo", "--push-to-hub", "me/travel-evals")
    assert result.exit_code == 0, result.output
    assert calls["create_repo"][:2] == ("me/travel-evals", "dataset")
    repo_id, repo_type, files = calls["commit"]
    assert (repo_id, repo_type) == ("me/travel-evals", "dataset")
    assert files == [("feedback.dpo.jsonl", str(tmp_path / "feedback.dpo.jsonl"))]
    assert "pushed to https://huggingface.co/datasets/me/travel-evals" in result.output


def test_push_without_token_is_a_user_error(tmp_path):
    db = tmp_path / "feedback.db"
    fill(db, 1, 0, 0)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored login either
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "feedback", "export", str(db), "--push-to-hub", "me/x"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 2 and "no Hugging Face token" in proc.stderr
