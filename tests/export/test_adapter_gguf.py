"""`tunelab export RUN --adapter-gguf`: the adapter as a GGUF LoRA beside the unmerged base, applied per request by
llama.cpp's server, answers as the merged GGUF does; with the adapter's scale at 0 it answers as the base."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.models.inference import GenerationParams, LlamaCppBackend
from tunelab.serve.llama_server import LlamaServer, LlamaServerBackend, llama_server_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = [{"role": "user", "content": "Plan a day in Porto."}]
GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_new_tokens=16, repetition_penalty=1.0, seed=0)


def answer(backend) -> str:
    return "".join(backend.stream_chat(MESSAGES, GREEDY))


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("adapter-gguf") / "run"
    shutil.copytree(tiny_run, run)  # the shared tiny run's own export/ stays as the other tests left it
    result = CliRunner().invoke(app, ["export", str(run), "--gguf", "f16", "--adapter-gguf", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return run / "export"


def test_export_writes_the_lora_and_its_base(exported):
    from gguf import GGUFReader

    lora = GGUFReader(str(exported / "adapter-f16.gguf"))
    assert str(bytes(lora.fields["general.type"].parts[-1]), "utf-8") == "adapter"
    assert any(t.name.endswith(".lora_a") for t in lora.tensors)
    base = GGUFReader(str(exported / "base-f16.gguf"))
    assert "tokenizer.chat_template" in base.fields  # the training template, as in the merged GGUF


def test_adapter_applied_per_request_answers_as_the_merged_model(exported):
    binary = llama_server_binary(build=False)
    assert binary is not None, "no llama-server build: `make install` builds it"
    merged = LlamaCppBackend(exported / "model-f16.gguf", threads=1)
    base = LlamaCppBackend(exported / "base-f16.gguf", threads=1)
    merged_answer, base_answer = answer(merged), answer(base)
    assert merged_answer != base_answer  # the adapter changes the answer, so the comparison below means something
    lora = exported / "adapter-f16.gguf"
    with LlamaServer(binary, exported / "base-f16.gguf", parallel=2, threads=1, loras=[lora]) as server:
        tuned = LlamaServerBackend(server.url, slots=2, lora_scales={0: 1.0})
        assert answer(tuned) == merged_answer
        assert answer(tuned.with_lora({0: 0.0}, model_id="base")) == base_answer  # one base in memory, two models
