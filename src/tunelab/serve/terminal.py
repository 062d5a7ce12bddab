"""`tunelab chat`: a streaming chat in the terminal over any ChatBackend."""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from tunelab.serve.backends import ChatBackend, GenerationParams


def chat_loop(
    backend: ChatBackend, params: GenerationParams, system: str | None = None,
    read: Callable[[str], str] = input, out: TextIO = sys.stdout,
) -> list[dict[str, str]]:
    """Read user lines until EOF or /exit; stream each reply. Returns the conversation (for tests)."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"{backend.model_id} ({backend.kind}). /reset clears the conversation, /exit or Ctrl-D quits.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return messages
        if line in ("/exit", "/quit"):
            return messages
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        out.write("bot> ")
        reply = ""
        try:
            for piece in backend.stream_chat(messages, params):
                reply += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            out.write(" [stopped]")
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
