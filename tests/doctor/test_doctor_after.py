"""The after-training checks on run folders: each fails on a deliberately broken run or export and passes on a
good one. Runs are built without training (tests/helpers.make_run_dir) and exported with `export_run`."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import make_tiny_model
from tunelab.doctor.after import (
    RunState,
    check_adapter_changes_answers,
    check_gguf_template,
    check_heldout_loss,
    check_llama_cpp_tokens,
    check_merged,
    check_stops,
    quant_check,
)
from tunelab.doctor.report import FAIL, PASS, SKIP

pytestmark = pytest.mark.slow


def copy_run(root, tmp_path, export: bool = True):
    run = tmp_path / "run"
    shutil.copytree(root / "run", run, ignore=None if export else shutil.ignore_patterns("export"))
    return run


def test_adapter_and_heldout_checks_pass_on_a_real_adapter_and_fail_on_a_zero_one(peaky, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    good = RunState(peaky / "run", threads=1)
    assert check_adapter_changes_answers(good).status == PASS
    assert check_heldout_loss(good).status != FAIL

    run = copy_run(peaky, tmp_path, export=False)
    weights_file = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}, str(weights_file))
    zero = RunState(run, threads=1)
    adapter, heldout = check_adapter_changes_answers(zero), check_heldout_loss(zero)
    assert adapter.status == FAIL and "0/3 prompts" in adapter.evidence
    assert heldout.status == FAIL
    assert check_merged(zero).status == SKIP and check_gguf_template(zero).status == SKIP


def test_merged_check_fails_when_the_merged_folder_is_the_base(peaky, tmp_path):
    assert check_merged(RunState(peaky / "run", threads=1)).status == PASS
    run = copy_run(peaky, tmp_path)
    shutil.rmtree(run / "export" / "merged")
    shutil.copytree(peaky / "base", run / "export" / "merged")  # a merge that forgot the adapter
    result = check_merged(RunState(run, threads=1))
    assert result.status == FAIL and "0/3" in result.evidence


def test_gguf_exported_with_another_template_fails_the_template_and_token_checks(peaky, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.export.gguf import convert_hf_to_gguf, gguf_metadata
    from tunelab.models.templates import resolve_chat_template

    good = RunState(peaky / "run", threads=1)
    assert check_gguf_template(good).status == PASS
    assert check_llama_cpp_tokens(good).status == PASS

    run = copy_run(peaky, tmp_path)
    other = tmp_path / "merged-zephyr"
    shutil.copytree(run / "export" / "merged", other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = resolve_chat_template("zephyr", tokenizer)
    tokenizer.save_pretrained(other)
    (run / "export" / "model-q8_0.gguf").unlink()
    convert_hf_to_gguf(other, run / "export" / "model-f16.gguf")
    assert gguf_metadata(run / "export" / "model-f16.gguf")["tokenizer.chat_template"] == tokenizer.chat_template
    broken = RunState(run, threads=1)
    template, tokens = check_gguf_template(broken), check_llama_cpp_tokens(broken)
    assert template.status == FAIL and "model-f16.gguf" in template.evidence
    assert tokens.status == FAIL and "model-f16.gguf from token" in tokens.evidence


def test_quantised_file_of_a_different_model_fails_its_quant_check(peaky, tmp_path):
    from tunelab.export.gguf import convert_hf_to_gguf, quantize_gguf

    good = RunState(peaky / "run", threads=1)
    assert quant_check("f16")(good).status == PASS
    assert quant_check("q8_0")(good).status == PASS

    run = copy_run(peaky, tmp_path)
    other = make_tiny_model(tmp_path / "other", seed=1)
    other_f16 = convert_hf_to_gguf(other, tmp_path / "other-f16.gguf")
    quantize_gguf(other_f16, run / "export" / "model-q8_0.gguf", "q8_0", threads=1)
    broken = RunState(run, threads=1)
    assert quant_check("f16")(broken).status == PASS
    result = quant_check("q8_0")(broken)
    assert result.status == FAIL and "0/3" in result.evidence and "first token" in result.evidence


def test_stop_check_passes_when_turns_end_and_fails_when_they_never_do(peaky, stopping):
    stops = check_stops(RunState(stopping / "run", threads=1))
    assert stops.status == PASS and "f16 2/2" in stops.evidence
    never = check_stops(RunState(peaky / "run", threads=1))  # random weights: <|im_end|> never wins greedily
    assert never.status == FAIL and "f16 0/2" in never.evidence
