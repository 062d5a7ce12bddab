"""The thin OpenAI-compatible app over TransformersBackend (merged / run folders), in-process, against plain
transformers generate() with the tokenizer's chat template as the reference."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import small_llama_folder

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return small_llama_folder(tmp_path_factory.mktemp("api-tf"))


@pytest.fixture(scope="module")
def client(folder):
    from fastapi.testclient import TestClient

    from tunelab.serve.api import api_app

    with TestClient(api_app(folder, api_key="k", threads=1)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reference(folder) -> tuple[str, int, int]:
    """(greedy text, prompt tokens, completion tokens) from plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    stop_ids = [tokenizer.eos_token_id, model.generation_config.eos_token_id]  # the template's and the model's
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=stop_ids,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[0, ids["input_ids"].shape[-1] :]
    return tokenizer.decode(new, skip_special_tokens=True), ids["input_ids"].shape[-1], len(new)


def body(**extra) -> dict:
    return {"model": "small-llama", "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS, **extra}


def test_models_lists_the_folder(client):
    response = client.get("/v1/models", headers={"Authorization": "Bearer k"})
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["small-llama"]


def test_api_key_is_enforced(client):
    assert client.get("/v1/models").status_code == 401
    assert client.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer nope"}).status_code == 401


def test_non_streaming_equals_transformers_generate(client, reference):
    text, prompt_tokens, _ = reference
    assert text.strip()  # the random model does say something: the comparison below has content to compare
    response = client.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer k"})
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert reply["usage"]["prompt_tokens"] == prompt_tokens


def test_streaming_equals_transformers_generate(client, reference):
    pieces, finish = [], []
    with client.stream(
        "POST", "/v1/chat/completions", json=body(stream=True), headers={"Authorization": "Bearer k"}
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[len("data: ") :])["choices"][0]
        pieces.append(choice["delta"].get("content", ""))
        finish.append(choice["finish_reason"])
    assert "".join(pieces) == reference[0]
    assert finish[-1] == ("length" if reference[2] >= MAX_TOKENS else "stop") and set(finish[:-1]) == {None}


@pytest.mark.parametrize(
    "bad", [{"messages": []}, {"messages": [{"role": "tool", "content": "x"}]}, {"messages": MESSAGES, "top_p": 0}]
)
def test_bad_request_is_400_naming_the_field(client, bad):
    response = client.post("/v1/chat/completions", json=bad, headers={"Authorization": "Bearer k"})
    assert response.status_code == 400
    assert any(word in response.json()["error"]["message"] for word in ("messages", "top_p"))


def test_cli_refuses_api_with_backend_url(tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(app, ["serve", "--api", "--backend-url", "http://127.0.0.1:9/v1"])
    assert result.exit_code != 0
    assert "pick one" in str(result.exception) + result.output
