"""`tunelab serve MODEL.gguf --api` in a real subprocess on loopback, on both engines (llama.cpp's own batching
server and llama-cpp-python's), checked with plain httpx against llama_cpp.Llama called directly; and the app on
`--backend-url` pointing at it."""

from __future__ import annotations

import html
import json
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import embedded_gguf, free_port, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

API_KEY = "test-key-0123456789"
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
OPENAI_KIND = "openai-api"
GREEDY = {"temperature": 0.0, "max_tokens": 24, "repeat_penalty": 1.0, "seed": 0}


@pytest.fixture(scope="module", params=["llama-server", "llama-cpp-python"])
def api_server(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("api-server")
    port = free_port()
    args = ["--api", "--api-key", API_KEY, "--engine", request.param]
    # serve_process runs the real CLI in its own session and kills it (and its children) on exit
    with serve_process(embedded_gguf(), folder / "unused.db", extra_args=args, port=port,
                       env={"TMPDIR": str(folder)}) as srv:  # fmt: skip
        srv.base, srv.engine = f"http://127.0.0.1:{port}/v1", request.param
        wait_until_loaded(srv.base)
        yield srv
    assert not (folder / "unused.db").exists()  # --api never opens the app's feedback database


@pytest.fixture(scope="module")
def reference_llama():
    """llama.cpp called directly: the GGUF's own chat template, one thread like the server."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(embedded_gguf()), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    yield llm
    llm.close()


def wait_until_loaded(base: str, timeout_s: float = 120) -> None:
    """llama-server listens while it loads the model and answers 503 until it is ready."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{base}/models", headers=auth()).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.25)


def reference_reply(llm, messages=MESSAGES, **settings) -> str:
    out = llm.create_chat_completion(messages=messages, **{**GREEDY, **settings})
    return out["choices"][0]["message"]["content"]


def app_reply(api_server, llm) -> str:
    """The greedy answer the app should show: llama.cpp's own, with the app's repetition penalty and top_p.

    The two engines apply a repetition penalty differently (llama-server counts the prompt's last tokens too,
    llama-cpp-python only the generated ones), so under the penalty each engine is its own reference: llama.cpp
    called in-process for llama-cpp-python, the same server queried directly for llama-server (whose
    penalty-free answers the other tests check against llama.cpp in-process)."""
    if api_server.engine == "llama-cpp-python":
        return reference_reply(llm, repeat_penalty=1.1, top_p=0.9)
    body = {"messages": MESSAGES, **GREEDY, "repeat_penalty": 1.1, "top_p": 0.9}
    response = httpx.post(f"{api_server.base}/chat/completions", json=body, headers=auth(), timeout=300)
    return response.json()["choices"][0]["message"]["content"]


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_models_lists_the_gguf(api_server):
    response = httpx.get(f"{api_server.base}/models", headers=auth())
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [embedded_gguf().name]


@pytest.mark.parametrize("headers", [{}, auth("wrong-key")], ids=["no-key", "wrong-key"])
def test_api_key_is_enforced(api_server, headers):
    assert httpx.get(f"{api_server.base}/models", headers=headers).status_code == 401
    body = {"messages": MESSAGES, **GREEDY}
    assert httpx.post(f"{api_server.base}/chat/completions", json=body, headers=headers).status_code == 401


def test_non_streaming_reply_equals_llama_cpp(api_server, reference_llama):
    body = {"model": embedded_gguf().name, "messages": MESSAGES, **GREEDY}
    response = httpx.post(f"{api_server.base}/chat/completions", json=body, headers=auth(), timeout=300)
    assert response.status_code == 200, response.text
    reply = response.json()
    content = reply["choices"][0]["message"]["content"]
    assert content.strip()
    assert content == reference_reply(reference_llama)
    # the prompt is the training chat template (the run tokenizer's), not a format llama.cpp guessed
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    template_ids = load_tokenizer(ModelConfig()).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True
    )
    if hasattr(template_ids, "keys"):  # a BatchEncoding in transformers 5
        template_ids = template_ids["input_ids"]
    assert reply["usage"]["prompt_tokens"] == len(template_ids)
    assert "<|im_end|>" not in content and "<|im_start|>" not in content  # stops at the template's EOS


def test_stop_token_ends_a_short_answer(api_server, reference_llama):
    messages = [{"role": "user", "content": "Reply with the single word: yes"}]
    body = {"messages": messages, **GREEDY, "max_tokens": 200}
    reply = httpx.post(f"{api_server.base}/chat/completions", json=body, headers=auth(), timeout=300).json()
    assert reply["choices"][0]["finish_reason"] == "stop"  # ended by EOS (<|im_end|>), not by max_tokens
    assert reply["usage"]["completion_tokens"] < 200
    assert reply["choices"][0]["message"]["content"] == reference_reply(reference_llama, messages, max_tokens=200)


def test_streaming_reply_equals_llama_cpp(api_server, reference_llama):
    body = {"messages": MESSAGES, **GREEDY, "stream": True}
    pieces, finish = [], None
    with httpx.stream(
        "POST", f"{api_server.base}/chat/completions", json=body, headers=auth(), timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            choice = json.loads(line[len("data: ") :])["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    assert sum(1 for p in pieces if p) > 1  # really streamed, piece by piece
    assert "".join(pieces) == reference_reply(reference_llama)
    assert finish in ("stop", "length")


def test_app_on_backend_url_answers_and_stores_feedback(api_server, reference_llama, tmp_path, monkeypatch):
    from tunelab.models.openai_backend import OpenAIBackend
    from tunelab.serve.app import build_app
    from tunelab.serve.feedback_store import FeedbackStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the app's download folder goes under tmp_path
    backend = OpenAIBackend(api_server.base, api_key=API_KEY)
    assert backend.model_id == embedded_gguf().name  # the first model the server lists
    demo = build_app(backend, tmp_path / "fb.db")
    app = demo.tunelab_app
    outputs = list(app.chat("What is the capital of France?", "Answer briefly.", 0.0, 0.9, 24, [], None))
    _, turns, record, _, status = outputs[-1]
    assert status.startswith("Done"), status
    # the app's defaults (repetition penalty 1.1) travel to the server: same answer as llama.cpp with them
    expected = app_reply(api_server, reference_llama)
    assert turns[-1]["assistant"] == expected
    saved = app.submit_feedback("up", ["helpful"], "", "", record)
    assert saved[0].startswith("✅"), saved[0]
    rows = FeedbackStore(tmp_path / "fb.db").rows()
    assert [(r["response"], r["model_id"]) for r in rows] == [(expected, embedded_gguf().name)]


def test_backend_url_with_wrong_key_is_a_user_error(api_server):
    from tunelab.errors import UserError
    from tunelab.models.openai_backend import OpenAIBackend

    with pytest.raises(UserError, match="401"):
        OpenAIBackend(api_server.base, api_key="wrong-key")


def test_cli_app_on_backend_url_end_to_end(api_server, reference_llama, tmp_path):
    """`tunelab serve MODEL_NAME --backend-url URL --api-key KEY` (a second subprocess) through gradio_client."""
    from gradio_client import Client

    from tests.helpers import db_rows, last_assistant_text

    remote = ["--backend-url", api_server.base, "--api-key", API_KEY]
    model_name = Path(embedded_gguf().name)  # with --backend-url the argument names the remote model
    with serve_process(model_name, tmp_path / "fb.db", extra_args=remote, env={"TMPDIR": str(tmp_path)}) as app:
        client = Client(app.url, verbose=False)
        chatbot, _, status = client.predict("What is the capital of France?", "Answer briefly.", 0.0, 0.9, 24,
                                            api_name="/chat")  # fmt: skip
        assert status.startswith("Done"), status
        expected = app_reply(api_server, reference_llama)
        assert html.unescape(last_assistant_text(chatbot)) == expected
        saved = client.predict("up", [], "", "", api_name="/chat_feedback")[0]
        assert saved.startswith("✅"), saved
        assert [(r["response"], r["model_id"]) for r in db_rows(tmp_path / "fb.db")] == [(expected, model_name.name)]
        assert f"({OPENAI_KIND})" in app.log()  # the CLI really built the remote backend
