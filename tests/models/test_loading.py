"""Model names resolve to loadable folders, chat templates can be forced, and mistakes are one-line errors."""

from __future__ import annotations

import pytest

from tunelab.config import ModelConfig
from tunelab.models import ModelError, load_tokenizer, resolve_model_path
from tunelab.models.loading import check_quantization_supported, embedded_gguf_path
from tunelab.models.templates import TemplateError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_embedded_model_is_found_and_converted_once(monkeypatch):
    from pathlib import Path

    from tunelab.models import loading

    conversions = []
    real_convert = loading._convert_gguf_to_hf
    monkeypatch.setattr(loading, "_convert_gguf_to_hf", lambda *a: conversions.append(a) or real_convert(*a))
    gguf = embedded_gguf_path("smollm2-135m")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    folder = resolve_model_path("embedded:smollm2-135m")
    converted = len(conversions)
    assert converted <= 1  # 0 when an earlier run (or test) already cached it
    assert resolve_model_path("embedded:smollm2-135m") == folder
    assert len(conversions) == converted  # cached: the second call converts nothing

    files = {p.name for p in Path(folder).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in Path(folder).parent.iterdir())


def test_tokenizer_uses_its_own_template_by_default_and_named_ones_on_request(tmp_path):
    own = load_tokenizer(ModelConfig())
    assert own.apply_chat_template(MESSAGES, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    llama = load_tokenizer(ModelConfig(chat_template="llama-3.1"))
    text = llama.apply_chat_template(MESSAGES, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert load_tokenizer(ModelConfig(chat_template=str(custom))).apply_chat_template(MESSAGES, tokenize=False) == (
        "[system] Be brief.\n[user] Hi\n[assistant] Hello!\n"
    )


def test_unknown_template_is_a_one_line_error():
    with pytest.raises(TemplateError, match="model.chat_template: unknown template `vicuna`"):
        load_tokenizer(ModelConfig(chat_template="vicuna"))


@pytest.mark.parametrize(
    "name, message",
    [
        ("embedded:gpt-17", "unknown embedded model"),
        ("/nowhere/model.gguf", "GGUF file not found"),
        ("./no/such/folder", "folder not found"),
    ],
)
def test_bad_model_names_are_one_line_errors(name, message):
    with pytest.raises(ModelError, match=message):
        resolve_model_path(name)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        resolve_model_path(str(tmp_path))


def test_hub_id_offline_fails_fast_with_one_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        resolve_model_path("someone/never-downloaded-model")


def test_4bit_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelError, match="model.load_in_4bit: needs a CUDA GPU"):
        check_quantization_supported(ModelConfig(load_in_4bit=True))


def test_bf16_load_from_the_fp32_folder_reads_without_mmap_and_equals_from_pretrained(monkeypatch):
    """bf16 training from the cached fp32 folder: tunelab reads each tensor with pread (the memory-mapped fp32 file
    no longer stays resident during the conversion) and gets exactly what from_pretrained gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model
    from tunelab.models import loading

    used = []
    real = loading._load_converting_without_mmap
    monkeypatch.setattr(loading, "_load_converting_without_mmap", lambda *a: used.append(r := real(*a)) or r)
    path = resolve_model_path("embedded:smollm2-135m")
    model = load_model(ModelConfig(), dtype=torch.bfloat16)
    assert used and used[0] is model  # the pread path was taken
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # one copy of the weights, in bf16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.name_or_path == reference.name_or_path == path
    assert model.config.to_dict() == reference.config.to_dict()
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    ids = torch.tensor([[1, 2, 3, 400, 5000, 17]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # fp32 from the fp32 folder: nothing to convert, from_pretrained's zero-copy memory map is kept
    assert real(path, torch.float32) is None
