"""The issue's "done means" on the real 135M model: one full export, then the consumers' views of it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of Australia?"}]


@pytest.fixture(scope="module")
def smol_export(smol_run, tmp_path_factory):
    from tunelab.cli import app

    space = tmp_path_factory.mktemp("smol_space") / "space"
    result = CliRunner().invoke(
        app, ["export", str(smol_run), "--gguf", "q4_k_m,q8_0,f16", "--space", str(space), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    return smol_run / "export", space, result.output


def test_all_files_and_parity_report(smol_export):
    export, space, output = smol_export
    for name in (
        "model-f16.gguf",
        "model-q8_0.gguf",
        "model-q4_k_m.gguf",
        "parity.json",
        "merged/README.md",
        "merged/model.safetensors",
        "merged/generation_config.json",
    ):
        assert (export / name).is_file(), name
    for name in ("README.md", "app.py", "requirements.txt", "model-q4_k_m.gguf"):
        assert (space / name).is_file(), name
    report = json.loads((export / "parity.json").read_text())
    rows = {r["quant"]: r for r in report["ggufs"]}
    assert rows["f16"]["passed"] is True and rows["q8_0"]["passed"] is None
    assert abs(rows["f16"]["ppl_delta_pct"]) < 1.0
    assert "ppl gguf" in output and "PASS" in output  # the table is printed


def test_merged_folder_gives_the_adapters_greedy_answer(smol_run, smol_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.runs import load_run_model

    export, _, _ = smol_export
    plain = AutoModelForCausalLM.from_pretrained(str(export / "merged"))  # no tunelab, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(str(export / "merged"))
    adapted, run_tokenizer = load_run_model(smol_run)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.inference_mode():
        merged_out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        adapter_out = adapted.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
    assert merged_out.tolist() == adapter_out.tolist()
    # generate() with the saved generation_config stops at <|im_end|> on its own
    assert plain.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_gguf_chats_with_the_right_template(smol_export, quant):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    export, _, _ = smol_export
    tokenizer = AutoTokenizer.from_pretrained(str(export / "merged"))
    # A plain Llama(model_path=...), as any llama.cpp user would load it (`make` builds llama-cpp-python
    # without the AMX kernels that crash on this VM; see the Makefile).
    llm = Llama(model_path=str(export / f"model-{quant}.gguf"), n_threads=1, n_ctx=512, verbose=False)
    meta = llm.metadata
    formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="")
    prompt = formatter(messages=QUESTION).prompt
    assert prompt == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert llm.token_eos() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = llm.create_chat_completion(QUESTION, temperature=0.0, max_tokens=48)["choices"][0]
    assert reply["message"]["content"].strip() and "<|im_" not in reply["message"]["content"]
