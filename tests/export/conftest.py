"""Test run folders shaped like `tunelab train` output (models/runs.py), without training.

The adapter is initialised with non-zero LoRA weights so that it really changes the model's outputs:
a merge that forgot the adapter would then be caught by comparing against the base.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_run_dir(run_dir: Path, model_name: str = "embedded:smollm2-135m", seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.config import Config, ModelConfig
    from tunelab.models import load_model, load_tokenizer

    cfg = Config(model=ModelConfig(name=model_name))
    cfg.train.output_dir = str(run_dir)
    torch.manual_seed(seed)
    base = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def make_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A random-init 2-layer Llama with the SmolLM2 tokenizer, saved as its own HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # peaky logits, so greedy decoding has clear winners (no fp16 near-ties)
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(name="make_tiny_model", scope="session")
def make_tiny_model_fixture():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_model(root / "base")
    return make_run_dir(root / "run", model_name=str(base))


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("smol") / "run")
