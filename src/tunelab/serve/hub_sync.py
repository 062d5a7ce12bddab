"""Durable feedback for a Hugging Face Space: copy the feedback DB to a Hub dataset repo in the background.

A Space's disk is wiped on restart, so the app (the Space bundle's app.py) calls

    sync = start_feedback_sync("feedback.db")   # None unless FEEDBACK_REPO is set and a token is available

Every `every_s` seconds (default 5 minutes) a daemon thread exports the DB to JSONL
(`export_feedback(..., fmt="jsonl")`, every row decoded) and, if the file changed, uploads it to the dataset
repo as `data/feedback-<instance>.jsonl`. `<instance>` is a random id kept in `<db>.sync-id` next to the DB: a
Space restart (fresh disk, fresh DB whose ids start at 1 again) starts a new file instead of overwriting the
old one, while restarting a local app on the same DB keeps updating its own file. Load them all with
`datasets.load_dataset("user/evals", data_files="data/*.jsonl")`. Side-by-side picks (their own columns) go to
`pairwise/pairwise-<instance>.jsonl` the same way (`data_files="pairwise/*.jsonl"`).

Requests never wait for a sync (the thread only reads the DB through SQLite's WAL). An upload that fails is
logged in one line and retried at the next tick. The token is only read by huggingface_hub (env `HF_TOKEN`,
the Space secret, or `hf auth login`); this module never reads, logs or writes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from tunelab.io import write_jsonl
from tunelab.serve.feedback_export import export_feedback
from tunelab.serve.feedback_store import iter_pairwise_rows

log = logging.getLogger(__name__)

DEFAULT_EVERY_S = 300.0
Uploader = Callable[[Path, str], None]  # (local file, path in the repo) -> uploaded or raises


class FeedbackSync:
    """Export + upload on a timer. `sync_once()` is the unit of work; `start()`/`stop()` run it in a thread."""

    def __init__(
        self,
        db_path: str | Path,
        upload: Uploader,
        *,
        every_s: float = DEFAULT_EVERY_S,
        folder: str | Path | None = None,
        say: Callable[[str], None] = print,
    ):
        self.db_path = Path(db_path)
        self.upload = upload
        self.every_s = every_s
        self.folder = Path(folder) if folder else self.db_path.with_name(self.db_path.name + ".sync")
        self.say = say
        instance = _instance_id(self.db_path)
        self.path_in_repo = f"data/feedback-{instance}.jsonl"
        self.local_file = self.folder / Path(self.path_in_repo).name
        self.pairwise_path_in_repo = f"pairwise/pairwise-{instance}.jsonl"
        self.pairwise_file = self.folder / Path(self.pairwise_path_in_repo).name
        self.uploads = 0
        self._last_digest: dict[str, str] = {}
        self._lock = threading.Lock()  # one sync at a time (timer thread and the final sync on shutdown)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync_once(self) -> bool:
        """Export the DB and upload it if it changed since the last upload. True when something was uploaded."""
        with self._lock:
            if not self.db_path.is_file():
                return False
            files = [
                (export_feedback(self.db_path, self.local_file, fmt="jsonl"), self.local_file, self.path_in_repo),
                (
                    write_jsonl(self.pairwise_file, iter_pairwise_rows(self.db_path)),
                    self.pairwise_file,
                    self.pairwise_path_in_repo,
                ),
            ]
            uploaded = False
            for rows, local_file, path_in_repo in files:
                digest = hashlib.sha256(local_file.read_bytes()).hexdigest()
                if rows == 0 or digest == self._last_digest.get(path_in_repo):
                    continue
                self.upload(local_file, path_in_repo)
                self._last_digest[path_in_repo] = digest
                self.uploads += 1
                uploaded = True
            return uploaded

    def _safe_sync(self) -> None:
        try:
            if self.sync_once():
                self.say(f"feedback sync: uploaded {self.path_in_repo}")
        except Exception as exc:  # noqa: BLE001 - never kill the thread; try again at the next tick
            first_line = (str(exc).splitlines() or [""])[0][:200]
            self.say(f"feedback sync failed ({type(exc).__name__}: {first_line}); retrying in {self.every_s:.0f} s")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._safe_sync()

    def start(self) -> FeedbackSync:
        self._thread = threading.Thread(target=self._run, name="feedback-hub-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self, final_sync: bool = True, timeout_s: float = 60.0) -> None:
        """Stop the timer; by default upload once more, so the last few minutes of feedback are not lost."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if final_sync:
            self._safe_sync()


def _instance_id(db_path: Path) -> str:
    marker = db_path.with_name(db_path.name + ".sync-id")
    try:
        value = marker.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_hex(6)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(value + "\n")
    return value


def hub_dataset_uploader(repo_id: str, private: bool = True) -> Uploader:
    """Upload one file to a (private by default) Hub dataset repo, creating the repo on first use."""
    from huggingface_hub import HfApi

    api = HfApi()  # token: env HF_TOKEN or the stored login, read by huggingface_hub itself
    created = False

    def upload(local_file: Path, path_in_repo: str) -> None:
        nonlocal created
        if not created:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            created = True
        api.upload_file(
            path_or_fileobj=str(local_file),
            path_in_repo=path_in_repo,
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"feedback: update {path_in_repo}",
        )

    return upload


def _token_available() -> bool:
    try:
        from huggingface_hub import get_token
    except ImportError:
        return False
    return bool(get_token())


def start_feedback_sync(
    db_path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    every_s: float | None = None,
    uploader: Uploader | None = None,
    token_available: Callable[[], bool] = _token_available,
    say: Callable[[str], None] = print,
) -> FeedbackSync | None:
    """Start syncing `db_path` to the dataset repo named by env FEEDBACK_REPO; say (one line) what happens.

    env FEEDBACK_SYNC_MINUTES overrides the interval (default 5). Returns None, after saying why, when there
    is no FEEDBACK_REPO or no token: feedback then stays on this machine's disk only.
    """
    env = os.environ if env is None else env
    repo_id = (env.get("FEEDBACK_REPO") or "").strip()
    if not repo_id:
        say(
            f"feedback is stored in {db_path} only (a Space's disk is wiped when it restarts, unless it has "
            "persistent storage); set FEEDBACK_REPO=user/name and the HF_TOKEN secret to copy it to a Hub dataset"
        )
        return None
    if uploader is None and not token_available():
        say(
            f"FEEDBACK_REPO={repo_id} but no Hugging Face token (add the HF_TOKEN secret): "
            f"feedback is stored in {db_path} only"
        )
        return None
    if every_s is None:
        every_s = 60.0 * float(env.get("FEEDBACK_SYNC_MINUTES") or DEFAULT_EVERY_S / 60)
    sync = FeedbackSync(db_path, uploader or hub_dataset_uploader(repo_id), every_s=every_s, say=say)
    say(f"feedback is copied every {every_s / 60:g} min to the Hub dataset {repo_id} ({sync.path_in_repo})")
    return sync.start()
