"""`tunelab chat`: the terminal loop over any ChatBackend, and the command on the embedded GGUF."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from tests.helpers import embedded_gguf
from tunelab.models.inference import GenerationParams
from tunelab.serve.chat import chat_loop


class EchoBackend:
    model_id, kind = "echo", "test"

    def stream_chat(self, messages, params=None):
        yield from ["you said: ", messages[-1]["content"], f" ({len(messages)} messages)"]


def test_terminal_chat_streams_resets_and_exits():
    lines = iter(["hello", "again", "/reset", "fresh", "/exit", "never read"])
    out = io.StringIO()
    messages = chat_loop(EchoBackend(), GenerationParams(), system="be brief", read=lambda _: next(lines), out=out)
    assert "bot> you said: hello (2 messages)" in out.getvalue()
    assert "you said: again (4 messages)" in out.getvalue()
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "fresh"},
        {"role": "assistant", "content": "you said: fresh (2 messages)"},
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_command_on_piped_stdin_answers_like_llama_cpp():
    """`tunelab chat MODEL.gguf` with stdin piped: one question, then end of input; the greedy reply equals
    llama.cpp's own chat completion on the same GGUF and settings."""
    from llama_cpp import Llama

    settings = ["--threads", "1", "--temperature", "0", "--max-new-tokens", "16", "--repetition-penalty", "1.0"]
    done = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "chat", str(embedded_gguf()), *settings, "--system", "Answer briefly."],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reply = done.stdout.split("bot> ", 1)[1].rsplit("\nyou> ", 1)[0]

    llm = Llama(model_path=str(embedded_gguf()), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        messages = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        expected = llm.create_chat_completion(
            messages=messages, temperature=0.0, top_p=0.9, max_tokens=16, repeat_penalty=1.0
        )["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert reply.strip() and reply == expected
