"""llama.cpp's own server as the engine behind the app: the binary `make install` built from the pinned sdist,
the app answering through it as llama.cpp answers directly, and two requests decoded together."""

from __future__ import annotations

import html
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import db_rows, embedded_gguf, last_assistant_text, serve_process
from tunelab.serve.llama_server import LlamaServer, LlamaServerBackend, default_parallel, llama_server_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def binary():
    found = llama_server_binary(build=False)
    assert found is not None, "no llama-server build: `make install` builds it from the llama-cpp-python sdist"
    return found


@pytest.fixture(scope="module")
def reference_llama():
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_gguf()), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    yield llm
    llm.close()


def test_default_slots_follow_the_core_count():
    assert [default_parallel(c) for c in (1, 2, 4, 8)] == [4, 8, 16, 16]


def test_app_on_a_gguf_answers_through_llama_server(binary, reference_llama, tmp_path):
    """`tunelab serve MODEL.gguf --engine llama-server`: the chat answer is the server's own for the app's settings
    (tests/serve/test_api_server.py checks the server's greedy answers against llama.cpp in-process), and the
    feedback on it is kept."""
    from gradio_client import Client

    app_settings = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 24, "repeat_penalty": 1.1, "seed": 0}
    with LlamaServer(binary, embedded_gguf(), parallel=1, threads=1) as server:
        body = {"messages": MESSAGES, **app_settings}
        expected = httpx.post(f"{server.url}/chat/completions", json=body, timeout=300).json()
        expected = expected["choices"][0]["message"]["content"]
        greedy = httpx.post(f"{server.url}/chat/completions", json={**body, "repeat_penalty": 1.0}, timeout=300)
    in_process = reference_llama.create_chat_completion(messages=MESSAGES, **{**app_settings, "repeat_penalty": 1.0})
    assert greedy.json()["choices"][0]["message"]["content"] == in_process["choices"][0]["message"]["content"]

    db = tmp_path / "fb.db"
    with serve_process(embedded_gguf(), db, extra_args=["--engine", "llama-server", "--parallel", "2"],
                       env={"TMPDIR": str(tmp_path)}) as app:  # fmt: skip
        client = Client(app.url, verbose=False)
        chatbot, _, status = client.predict("What is the capital of France?", "Answer briefly.", 0.0, 0.9, 24,
                                            api_name="/chat")  # fmt: skip
        assert status.startswith("Done"), status
        assert html.unescape(last_assistant_text(chatbot)) == expected
        saved = client.predict("up", [], "", "", api_name="/chat_feedback")[0]
        assert saved.startswith("✅"), saved
        assert [r["response"] for r in db_rows(db)] == [expected]
        assert "(llama-server)" in app.log()


def test_two_requests_are_decoded_together(binary):
    """With two slots the second request starts streaming before the first has finished; one-at-a-time serving
    would hold its first token until the first answer ended."""
    body = {"messages": MESSAGES, "temperature": 0.0, "max_tokens": 48, "stream": True, "ignore_eos": True}
    events: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def stream(server_url: str, index: int) -> None:
        with httpx.stream("POST", f"{server_url}/chat/completions", json=body, timeout=300) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["delta"].get("content"):
                        with lock:
                            events.append((time.monotonic(), index, "token"))
        with lock:
            events.append((time.monotonic(), index, "end"))

    with LlamaServer(binary, embedded_gguf(), parallel=2, threads=1) as server:
        workers = [threading.Thread(target=stream, args=(server.url, i)) for i in (0, 1)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    order = [(i, kind) for _, i, kind in sorted(events)]
    assert order.count((0, "end")) == order.count((1, "end")) == 1
    first_end = min(order.index((0, "end")), order.index((1, "end")))
    assert {i for i, kind in order[:first_end] if kind == "token"} == {0, 1}


def test_backend_sends_grammar_and_lora_scales():
    backend = object.__new__(LlamaServerBackend)
    backend.model_id, backend.lora_scales = "m.gguf", {0: 0.0, 1: 1.0}
    from tunelab.models.inference import GenerationParams

    body = backend.request_body(MESSAGES, GenerationParams(), grammar='root ::= "a"')
    assert body["grammar"] == 'root ::= "a"'
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "vllm"], "--engine: choose one of"),
        (["--parallel", "0"], "--parallel: must be >= 1"),
    ],
)
def test_bad_engine_options_are_one_line(args, message):
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", str(embedded_gguf()), "--api", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
