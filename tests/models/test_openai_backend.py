"""OpenAIBackend against a scripted HTTP server (httpx.MockTransport): request shape, SSE parsing, errors (fast).
The real server on loopback is covered in tests/serve/test_api_server.py."""

from __future__ import annotations

import json

import httpx
import pytest

from tunelab.errors import UserError
from tunelab.models.inference import GenerationParams
from tunelab.models.openai_backend import OpenAIBackend, RemoteModelError, api_base


def sse(*events) -> bytes:
    """An SSE body: dicts become `data: {json}` events, strings are sent as `data: <string>`, bytes verbatim."""
    return b"".join(e if isinstance(e, bytes) else f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode()
                    for e in events)  # fmt: skip


def chunk(content=None, finish=None) -> dict:
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def backend_with(handler, **kwargs) -> tuple[OpenAIBackend, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    backend = OpenAIBackend("http://model.invalid:8000", model="m", **kwargs)
    backend.client = httpx.Client(
        base_url=backend.base_url, headers=backend.client.headers, transport=httpx.MockTransport(record)
    )
    return backend, seen


def test_api_base_normalises_the_url():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(UserError, match="--backend-url"):
        api_base("h:8000")


def test_stream_chat_sends_openai_request_and_joins_deltas():
    body = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, chunk("Hel"), b": ping\n\n",
               chunk("lo"), chunk(None, "stop"), "[DONE]")  # fmt: skip
    backend, seen = backend_with(
        lambda r: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}), api_key="k"
    )
    messages = [{"role": "user", "content": "hi"}]
    params = GenerationParams(temperature=0.0, top_p=0.5, max_new_tokens=7, repetition_penalty=1.0, seed=3)
    assert list(backend.stream_chat(messages, params)) == ["Hel", "lo"]
    request = seen[0]
    assert request.url.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    sent = json.loads(request.content)
    assert sent == {"model": "m", "messages": messages, "stream": True, "temperature": 0.0, "top_p": 0.5,
                    "max_tokens": 7, "seed": 3}  # fmt: skip


def test_repetition_penalty_is_sent_under_both_server_spellings():
    backend, seen = backend_with(lambda r: httpx.Response(200, content=sse("[DONE]")))
    list(backend.stream_chat([{"role": "user", "content": "hi"}], GenerationParams(repetition_penalty=1.1)))
    sent = json.loads(seen[0].content)
    assert sent["repetition_penalty"] == sent["repeat_penalty"] == 1.1


def test_http_error_raises_with_status_and_message():
    backend, _ = backend_with(lambda r: httpx.Response(500, json={"error": {"message": "boom"}}))
    with pytest.raises(RemoteModelError, match="HTTP 500.*boom"):
        list(backend.stream_chat([{"role": "user", "content": "hi"}]))


def test_error_event_inside_the_stream_raises():
    backend, _ = backend_with(lambda r: httpx.Response(200, content=sse(chunk("a"), {"error": {"message": "ctx"}})))
    with pytest.raises(RemoteModelError, match="ctx"):
        list(backend.stream_chat([{"role": "user", "content": "hi"}]))


def test_unreachable_server_is_a_user_error():
    with pytest.raises(UserError, match="cannot reach"):
        OpenAIBackend("http://127.0.0.1:9")  # discard port: nothing listens; the model list is asked at start


def test_app_shows_a_remote_failure_as_a_message(tmp_path):
    from tunelab.serve.app import build_app

    backend, _ = backend_with(lambda r: httpx.Response(503, text="overloaded"))
    app = build_app(backend, tmp_path / "fb.db").tunelab_app
    *_, status = list(app.chat("Hello", "", 0.0, 0.9, 8, [], None))[-1]
    assert status.startswith("⚠️ Generation failed (RemoteModelError)"), status


def test_app_sends_remote_requests_in_parallel_but_local_ones_one_at_a_time(tmp_path):
    from tests.helpers import ScriptedBackend
    from tunelab.serve.app import build_app

    remote, _ = backend_with(lambda r: httpx.Response(200, content=sse("[DONE]")))
    for backend, expected in ((remote, OpenAIBackend.concurrency_limit), (ScriptedBackend(), 1)):
        demo = build_app(backend, tmp_path / f"{expected}.db")
        limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values() if fn.api_name in ("chat", "plan")}
        assert limits == {"chat": expected, "plan": expected}
