"""Feedback under concurrent load, and after a SIGKILL, against a real `tunelab serve` of the embedded GGUF.

Bounded: 20 clients x 50 submissions, one extra client chatting meanwhile, llama.cpp on 1 thread.
Each submission carries an idempotency key (submission_id). Under load gradio_client now and then loses the
reply stream of a request (it raises CancelledError although the server may have stored the row); like any
careful client, the workers then resend the same submission (at most 3 attempts): the key guarantees it is
stored once, and the row count proves it.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
import time

import pytest

from tests.helpers import db_rows, embedded_gguf, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLIENTS = 20
SUBMISSIONS = 50
LOAD_TIMEOUT_S = 420
ATTEMPTS = 3


class Load:
    """20 clients, each: one short chat (the answer to rate), then 50 feedback submissions with unique comments.
    Records which submissions the server acknowledged (the 'saved' reply only comes after COMMIT)."""

    def __init__(self, url: str, stop_after_acks: int | None = None):
        self.url = url
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.chats_during_load: list[str] = []
        self.retries = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.enough_acks = threading.Event()
        self.stop_after_acks = stop_after_acks

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def submit_all(self, worker: int) -> None:
        client = None
        try:
            client = self.client()
            client.predict("Say OK.", "", 0.0, 0.9, 4, api_name="/chat")
            for i in range(SUBMISSIONS):
                comment = f"load-{worker:02d}-{i:02d}"
                status = self.submit(client, "down" if i % 2 else "up", comment)
                if not status.startswith("✅"):
                    raise AssertionError(status)
                with self.lock:
                    self.acked.append(comment)
                    if self.stop_after_acks and len(self.acked) >= self.stop_after_acks:
                        self.enough_acks.set()
        except Exception as exc:  # after a SIGKILL every client ends here
            with self.lock:
                self.errors.append(f"{worker}: {type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                client.close()  # stops its heartbeat thread

    def submit(self, client, rating: str, comment: str) -> str:
        for attempt in range(ATTEMPTS):
            try:
                status, *_ = client.predict(rating, ["other"], comment, "", comment, api_name="/chat_feedback")
                return status
            except concurrent.futures.CancelledError:
                if attempt == ATTEMPTS - 1 or self.enough_acks.is_set():
                    raise
                with self.lock:
                    self.retries += 1
        raise AssertionError("unreachable")

    def keep_chatting(self) -> None:
        """A separate user chatting while the feedback load runs: the server must keep answering."""
        client = None
        try:
            client = self.client()
            while not self.done.is_set():
                try:
                    _, _, status = client.predict("Name a color.", "", 0.0, 0.9, 8, api_name="/chat")
                except concurrent.futures.CancelledError:  # a lost reply stream (see module docstring)
                    if self.enough_acks.is_set():
                        raise
                    with self.lock:
                        self.retries += 1
                    continue
                self.chats_during_load.append(status)
        except Exception as exc:
            with self.lock:
                self.errors.append(f"chatter: {type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                client.close()

    def run(self, while_running=None) -> None:
        workers = [threading.Thread(target=self.submit_all, args=(w,), daemon=True) for w in range(CLIENTS)]
        chatter = threading.Thread(target=self.keep_chatting, daemon=True)
        chatter.start()
        for t in workers:
            t.start()
        if while_running is not None:
            while_running(self)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        for t in workers:
            t.join(timeout=max(1, deadline - time.monotonic()))
        self.done.set()
        chatter.join(timeout=120)
        assert not any(t.is_alive() for t in workers), "load did not finish in time"


def integrity(db) -> str:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_1000_concurrent_feedback_submissions_all_stored_once_while_chat_keeps_answering(tmp_path):
    db = tmp_path / "feedback.db"
    with serve_process(embedded_gguf(), db) as server:
        load = Load(server.url)
        started = time.monotonic()
        load.run()
        elapsed = time.monotonic() - started
    assert load.errors == []
    comments = [row["comment"] for row in db_rows(db)]
    expected = {f"load-{w:02d}-{i:02d}" for w in range(CLIENTS) for i in range(SUBMISSIONS)}
    assert len(comments) == CLIENTS * SUBMISSIONS == 1000
    assert set(comments) == expected  # none lost, none duplicated
    assert sorted(load.acked) == sorted(expected)
    assert len(load.chats_during_load) >= 1 and all(s.startswith("Done") for s in load.chats_during_load)
    assert integrity(db) == "ok"
    print(
        f"1000 submissions in {elapsed:.1f} s ({load.retries} resent after a lost reply); "
        f"{len(load.chats_during_load)} chats answered meanwhile"
    )


def test_sigkill_mid_load_loses_no_acknowledged_submission(tmp_path):
    db = tmp_path / "feedback.db"
    with serve_process(embedded_gguf(), db) as server:
        load = Load(server.url, stop_after_acks=150)

        def kill_when_busy(load: Load) -> None:
            assert load.enough_acks.wait(timeout=LOAD_TIMEOUT_S), f"no load reached the server: {load.errors[:3]}"
            server.kill()  # SIGKILL: no shutdown hooks, no final commit

        load.run(while_running=kill_when_busy)
        with load.lock:
            acked = set(load.acked)
    assert 150 <= len(acked) < CLIENTS * SUBMISSIONS
    assert load.errors, "clients should have seen the server die"

    # restart on the same database: it opens, recovers its WAL, and keeps accepting feedback
    with serve_process(embedded_gguf(), db) as server:
        from gradio_client import Client

        client = Client(server.url, verbose=False)
        client.predict("Say OK.", "", 0.0, 0.9, 4, api_name="/chat")
        status, *_ = client.predict("up", [], "after restart", "", api_name="/chat_feedback")
        assert status.startswith("✅"), status
    assert integrity(db) == "ok"
    stored = [row["comment"] for row in db_rows(db)]
    assert acked <= set(stored), f"lost {len(acked - set(stored))} acknowledged submissions"
    assert len(stored) == len(set(stored))  # nothing written twice
    assert stored[-1] == "after restart"
