"""`tunelab chat`: the terminal loop over any ChatBackend."""

from __future__ import annotations

import io

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
