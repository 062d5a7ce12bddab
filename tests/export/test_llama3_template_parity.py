"""Template parity from training to GGUF with the real Llama-3.2 tokenizer (tiny random weights).

A run trained with `model.chat_template: llama-3.1` and exported with `tunelab export` gives a GGUF that carries
the same template; llama.cpp renders and tokenises a conversation to the ids transformers trained on (one
`<|begin_of_text|>`), and generation stops at `<|eot_id|>`.

Date and system lines: tunelab's `llama-3.1` template renders no "Cutting Knowledge Date / Today Date" preamble
(Meta's own template adds one, with `strftime_now` in 3.2, i.e. a different prompt on every day). Training,
`tunelab chat/serve` and llama.cpp therefore render byte-identical prompts; a system message is rendered only
when the conversation has one.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import conversations_file, llama32_shaped_folder

pytestmark = pytest.mark.slow

CONVERSATION = [
    {"role": "system", "content": "You plan trips."},
    {"role": "user", "content": "Two days in Porto?"},
    {"role": "assistant", "content": "Day 1: Ribeira.\nDay 2: Foz."},
    {"role": "user", "content": "And Braga?"},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from typer.testing import CliRunner

    from tunelab.cli import app

    root = tmp_path_factory.mktemp("llama3")
    base = llama32_shaped_folder(root / "base", stop_at_once=True)
    config = {
        "data": {
            "sources": [{"path": str(conversations_file(root, n=24))}],
            "val_fraction": 0.2,
            "dedup": {"near": False},
            "output_dir": str(root / "prepared"),
        },
        "model": {"name": str(base), "chat_template": "llama-3.1"},
        "train": {
            "output_dir": str(root / "run"),
            "max_steps": 2,
            "batch_size": 2,
            "max_seq_len": 128,
            "save_steps": 2,
            "eval_steps": 2,
            "precision": "fp32",
        },
        "eval": {"prompts": []},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(root / "config.yaml")])
    assert trained.exit_code == 0, trained.output
    done = runner.invoke(app, ["export", str(root / "run"), "--gguf", "f16,q4_k_m"])
    assert done.exit_code == 0, done.output
    return root / "run" / "export"


def test_gguf_carries_the_training_template_and_llama3_stop_tokens(exported):
    from tunelab.export.gguf import gguf_metadata
    from tunelab.models.templates import resolve_chat_template

    template = resolve_chat_template("llama-3.1", None)
    for name in ("model-f16.gguf", "model-q4_k_m.gguf"):
        meta = gguf_metadata(exported / name)
        assert meta["tokenizer.chat_template"] == template
        assert meta["tokenizer.ggml.bos_token_id"] == 128000
    generation = json.loads((exported / "merged" / "generation_config.json").read_text())
    assert 128009 in generation["eos_token_id"]  # <|eot_id|> ends a turn in transformers' generate too


@pytest.mark.parametrize("gguf", ["model-f16.gguf", "model-q4_k_m.gguf"])
def test_llama_cpp_renders_and_tokenises_what_training_saw_and_stops_at_eot(exported, gguf):
    from transformers import AutoTokenizer

    from tunelab.export.parity import llama_cpp_prompt, trained_prompt
    from tunelab.models.inference import open_llama

    tokenizer = AutoTokenizer.from_pretrained(exported / "merged")
    trained_text, trained_ids = trained_prompt(tokenizer, CONVERSATION)
    assert trained_ids.count(128000) == 1 and "Today Date" not in trained_text

    # what llama-cpp-python's chat completion does with the GGUF's template (Jinja2ChatFormatter, no extra BOS)
    llm = open_llama(exported / gguf, threads=1, n_ctx=256)
    try:
        cpp_text, cpp_ids = llama_cpp_prompt(llm, CONVERSATION)
        assert cpp_text == trained_text
        assert cpp_ids == trained_ids
        reply = llm.create_chat_completion(messages=CONVERSATION, max_tokens=16, temperature=0.0)
        # the model's first token is <|eot_id|>: a runtime that did not stop there would repeat it 16 times
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["message"]["content"] == ""
        assert reply["usage"]["completion_tokens"] <= 1
    finally:
        llm.close()
