"""`tunelab chat`: a streaming chat in the terminal over any ChatBackend."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer

from tunelab.models.inference import ChatBackend, GenerationParams


def chat_cmd(
    model: Annotated[Path, typer.Argument(help="A run folder, a merged HF folder or a .gguf file.")],
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.9,
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    repetition_penalty: Annotated[float, typer.Option()] = 1.1,
    system: Annotated[str | None, typer.Option(help="A system message for the conversation.")] = None,
) -> None:
    """Chat with a model in the terminal (streaming). /reset clears the conversation, /exit quits."""
    from tunelab.models.inference import load_backend

    params = GenerationParams(temperature, top_p, max_new_tokens, repetition_penalty).validate()
    backend = load_backend(model, threads=threads)
    chat_loop(backend, params, system=system)


def chat_loop(
    backend: ChatBackend,
    params: GenerationParams,
    system: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
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
