"""Small real models and data files that tests build for themselves."""

from __future__ import annotations

import json
import os

import torch


def tokenizer_for_tests():
    folder = os.environ.get("TUNELAB_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def small_llama_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer_for_tests()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    folder = tmp_path / "small-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def conversations_file(tmp_path, n=64):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            messages = [{"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def full_logits_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Reference for tunelab's chunked loss: full logits and plain cross-entropy (sum, number of targets)."""
    import torch.nn.functional as F

    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.train.loss import split_causal_lm

    decoder, lm_head = split_causal_lm(model)
    hidden = decoder(**batch.model_kwargs()).last_hidden_state
    logits = lm_head(hidden).float()
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, batch.num_targets
