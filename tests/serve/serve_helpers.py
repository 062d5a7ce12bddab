"""Helpers for the app tests: a scripted backend, free ports, and a real `tunelab serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"


class ScriptedBackend:
    """Deterministic stand-in for a model: replies `reply` (or echoes the last user message) word by word."""

    kind = "scripted"

    def __init__(self, reply: str | None = None, model_id: str = "scripted-model", fail_with: Exception | None = None):
        self.reply = reply
        self.model_id = model_id
        self.fail_with = fail_with
        self.calls: list[tuple[list[dict], object]] = []

    def stream_chat(self, messages, params=None):
        self.calls.append((messages, params))
        text = self.reply if self.reply is not None else "You said: " + messages[-1]["content"]
        words = text.split(" ")
        for i, word in enumerate(words):
            if self.fail_with is not None and i == 1:
                raise self.fail_with
            yield word if i == len(words) - 1 else word + " "


def embedded_gguf() -> Path:
    from tunelab.models.loading import embedded_gguf_path

    return embedded_gguf_path("smollm2-135m")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until the server answers HTTP (any status: 401 with --auth still means it is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def serve_process(
    model: Path,
    db: Path,
    *,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    host: str | None = "127.0.0.1",
    startup_timeout_s: float = 120,
    log_path: Path | None = None,
) -> Iterator["Server"]:
    """Run the real CLI (`tunelab serve`) on a free port; always killed on exit. host=None: the CLI's default."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", str(model), "--port", str(port), "--feedback-db", str(db),
           "--threads", "1", *(["--host", host] if host else []), *(extra_args or [])]  # fmt: skip
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", **(env or {})}
    log_path = log_path or db.with_suffix(f".{port}.log")
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}/", log_path)
    try:
        wait_for_http(server.url, startup_timeout_s, proc)
        yield server
    except BaseException:
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        server.kill()
        log_file.close()


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: only this server and its children
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def db_rows(db: Path, where: str = "1", args: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(f"SELECT * FROM feedback WHERE {where} ORDER BY id", args).fetchall()
    finally:
        conn.close()


def last_assistant_text(chatbot_value: list[dict]) -> str:
    """The text of the last assistant message in a Chatbot value as gradio_client returns it."""
    for message in reversed(chatbot_value):
        if message["role"] == "assistant":
            content = message["content"]
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content
    raise AssertionError(f"no assistant message in {chatbot_value!r}")


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp: state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]))
    return found
