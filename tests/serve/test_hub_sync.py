"""serve/hub_sync.py: the feedback DB reaches a Hub dataset in the background (fake uploader, no network)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tunelab.serve.feedback_store import FeedbackRecord, FeedbackStore
from tunelab.serve.hub_sync import FeedbackSync, start_feedback_sync

FAKE_TOKEN = "hf_FakeTokenForHubSync0123456789abcdef"


class FakeUploader:
    def __init__(self, fail_times: int = 0, hold: threading.Event | None = None):
        self.calls: list[tuple[str, list[dict]]] = []
        self.fail_times = fail_times
        self.hold = hold  # uploads wait until it is set: a slow network the test controls
        self.entered = threading.Event()
        self.uploaded = threading.Event()
        self.timed_out = False

    def __call__(self, local_file: Path, path_in_repo: str) -> None:
        self.entered.set()
        if self.hold is not None and not self.hold.wait(10):
            self.timed_out = True  # e.g. a start that waited for its first upload: the test never got to release it
            raise TimeoutError("held upload never released")
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("cannot reach huggingface.co\nsecond line")
        rows = [json.loads(line) for line in local_file.read_text().splitlines()]
        self.calls.append((path_in_repo, rows))
        self.uploaded.set()


def add(store: FeedbackStore, comment: str) -> int:
    return store.add(FeedbackRecord(
        session_id="s1", tab="chat", rating=-1, reasons=["too short"], comment=comment, better_answer="",
        messages=[{"role": "user", "content": "hi"}], inputs={"message": "hi"}, response="hello",
        model_id="m.gguf", params={"temperature": 0.0}, app_version="tunelab test",
    ))  # fmt: skip


def test_sync_once_uploads_only_changes_and_keeps_one_file_per_db(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    upload = FakeUploader()
    sync = FeedbackSync(db, upload, say=lambda m: None)
    assert sync.sync_once() is False and upload.calls == []  # empty DB: nothing to upload
    add(store, "first")
    assert sync.sync_once() is True
    assert sync.sync_once() is False  # unchanged: no second commit
    add(store, "second")
    assert sync.sync_once() is True
    (path1, rows1), (path2, rows2) = upload.calls
    assert path1 == path2 and path1.startswith("data/feedback-") and path1.endswith(".jsonl")
    assert [r["comment"] for r in rows2] == ["first", "second"]
    assert rows2[0]["reasons"] == ["too short"] and rows2[0]["messages"][0]["content"] == "hi"  # decoded rows
    # Same DB after a restart -> same file in the repo; a new DB (a restarted Space's fresh disk) -> a new file.
    assert FeedbackSync(db, upload).path_in_repo == path1
    other = tmp_path / "fresh" / "feedback.db"
    FeedbackStore(other).close()
    assert FeedbackSync(other, upload).path_in_repo != path1
    store.close()


def test_background_thread_does_not_block_and_survives_failures(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    add(store, "x")
    said: list[str] = []
    network = threading.Event()
    upload = FakeUploader(fail_times=1, hold=network)
    sync = start_feedback_sync(
        db, env={"FEEDBACK_REPO": "someone/evals"}, every_s=0.05, uploader=upload, say=said.append
    )
    # start returned while no upload can finish (the network is held): uploads happen in the thread
    assert upload.entered.wait(10) and not upload.uploaded.is_set()
    add(store, "written while a sync is under way")  # requests keep writing meanwhile
    network.set()
    assert upload.uploaded.wait(10) and not upload.timed_out
    sync.stop(final_sync=True)
    assert any("feedback sync failed (ConnectionError: cannot reach huggingface.co)" in m for m in said), said
    assert not any("second line" in m for m in said)
    assert [r["comment"] for r in upload.calls[-1][1]] == ["x", "written while a sync is under way"]
    assert "someone/evals" in said[0] and "every" in said[0]
    store.close()


def test_without_repo_or_token_feedback_stays_on_disk_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    said: list[str] = []
    assert start_feedback_sync(tmp_path / "f.db", env={}, say=said.append) is None
    assert "only" in said[0] and "FEEDBACK_REPO" in said[0]
    said.clear()
    assert (
        start_feedback_sync(
            tmp_path / "f.db", env={"FEEDBACK_REPO": "someone/evals"}, token_available=lambda: False, say=said.append
        )
        is None
    )
    assert "HF_TOKEN" in said[0] and "only" in said[0]
    for line in said:
        assert FAKE_TOKEN not in line


def test_default_uploader_pushes_to_a_dataset_repo(tmp_path, monkeypatch):
    """The real uploader's calls, with HfApi replaced: a private dataset repo, one file, token never passed."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_file(self, **kwargs):
            calls.append(("upload_file", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    add(store, "x")
    sync = start_feedback_sync(
        db, env={"FEEDBACK_REPO": "someone/evals"}, every_s=3600, token_available=lambda: True, say=lambda m: None
    )
    sync.stop(final_sync=True)
    sync.sync_once()
    names = [name for name, _ in calls]
    assert names == ["init", "create_repo", "upload_file"]
    assert calls[0][1] == {}
    assert calls[1][1] == {"repo_id": "someone/evals", "repo_type": "dataset", "private": True, "exist_ok": True}
    assert calls[2][1]["repo_type"] == "dataset" and calls[2][1]["path_in_repo"] == sync.path_in_repo
    store.close()


def test_side_by_side_picks_go_to_their_own_file(tmp_path):
    from tunelab.serve.feedback_store import PairwiseRecord

    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    upload = FakeUploader()
    sync = FeedbackSync(db, upload, say=lambda m: None)
    add(store, "a thumb")
    store.add_pairwise(PairwiseRecord(
        tab="chat", messages=[{"role": "user", "content": "hi"}], answer_a="A", answer_b="B", model_a_id="m",
        model_b_id="m", pick="b", app_version="t", session_id="s",
    ))  # fmt: skip
    assert sync.sync_once() is True
    assert [path.split("-")[0] for path, _ in upload.calls] == ["data/feedback", "pairwise/pairwise"]
    assert upload.calls[1][1][0]["pick"] == "b" and upload.calls[1][1][0]["answer_b"] == "B"
    add(store, "another thumb")  # only the feedback file changed
    assert sync.sync_once() is True and [p.split("-")[0] for p, _ in upload.calls[2:]] == ["data/feedback"]
    store.close()
