"""Every claimed architecture family: tunelab's packed attention + assistant-only head give the model's own
loss, sequence log-probs (dpo/kto) and LoRA gradients; anything else falls back to the model's own forward.

The reference is plain transformers: `model(input_ids, attention_mask, labels=...)` on padded rows (one
conversation per row, eager attention). Sliding windows (6 tokens) are shorter than the test conversations
(9 to 17 tokens), and soft-caps/logit scales are small enough to change the numbers, so a fast path that
ignored any of them would fail. Tolerance (fp32): loss to 1e-5 relative, gradients to 1e-4 relative of their norm.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import labels_loss_and_lora_grads
from tunelab.data.masking import IGNORE_INDEX as IGNORE
from tunelab.train import loss as loss_module
from tunelab.train.adapters import adapter_gradients
from tunelab.train.architectures import FAST_FAMILIES, plan_for, use_plan
from tunelab.train.batching import pack, pad
from tunelab.train.loss import LinearTokenLogProbs, masked_lm_loss
from tunelab.train.preference import sequence_logps

VOCAB = 256
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 6
LAYERS = ["sliding_attention", "full_attention"]


def family_configs():
    from transformers import (
        CohereConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama-tied": LlamaConfig(**SMALL, tie_word_embeddings=True),
        "qwen2-sliding": Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3-sliding": Qwen3Config(
            **SMALL, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        ),
        "mistral-sliding": MistralConfig(**SMALL, sliding_window=WINDOW),
        "phi3-sliding": Phi3Config(**SMALL, sliding_window=WINDOW),
        "gemma2-softcaps": Gemma2Config(
            **SMALL,
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=0.3,
        ),
        "gemma3-sliding": Gemma3TextConfig(
            **SMALL, head_dim=16, sliding_window=WINDOW, layer_types=LAYERS, final_logit_softcapping=0.3
        ),
        "cohere-logit-scale": CohereConfig(**SMALL, logit_scale=4.0),
        "granite-logits-scaling": GraniteConfig(
            **SMALL, logits_scaling=0.25, attention_multiplier=0.3, embedding_multiplier=3.0, residual_multiplier=0.5
        ),
    }


def examples(seed=0, lengths=(9, 17, 12)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]  # the last two thirds are "assistant"
        out.append((ids, labels))
    return out


def base_model(config):
    """A random-init model of `config` (the same weights on every call), in eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "eager"  # the most literal form of the model's own attention
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if base.lm_head.bias is not None:  # initialised to zero, which would hide a head that leaves the bias out
        torch.nn.init.normal_(base.lm_head.bias, std=1.0)
    return base


def lora_model(config, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is non-zero too, so the adapter changes the outputs and every LoRA weight has a
    # gradient.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    return get_peft_model(base_model(config), lora).train()


def tunelab_loss_and_grads(model, batch):
    model.zero_grad()
    loss_sum, n = masked_lm_loss(model, batch, chunk_tokens=7)  # several chunks
    loss = loss_sum / n
    loss.backward()
    return loss.detach(), lora_grads(model)


def lora_grads(model):
    grads = adapter_gradients(model)
    assert grads and all(g is not None for g in grads.values())
    return grads


def assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref.norm() > 0, name
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-4 * float(ref.norm()) + 1e-7, msg=name)


@pytest.mark.parametrize("name", list(family_configs()))
def test_packed_fast_path_equals_the_models_own_loss_and_gradients(name):
    config = family_configs()[name]
    model = lora_model(config)
    rows = examples()
    ref_loss, ref_grads = labels_loss_and_lora_grads(model, rows)
    assert plan_for(model).fast, plan_for(model).reason
    assert use_plan(model, packing=True, log=lambda *_: None)
    loss, grads = tunelab_loss_and_grads(model, pack(rows))
    assert_same(loss, grads, ref_loss, ref_grads)


def test_every_claimed_family_is_tested():
    tested = {c.model_type for c in family_configs().values()}
    assert tested == set(FAST_FAMILIES)


def test_ignoring_the_sliding_window_would_be_caught():
    """The comparison above can fail: with the window removed from the packed path the loss differs."""
    model = lora_model(family_configs()["mistral-sliding"])
    rows = examples()
    ref_loss, _ = labels_loss_and_lora_grads(model, rows)
    use_plan(model, packing=True, log=lambda *_: None)
    model.config.sliding_window = None
    loss, _ = tunelab_loss_and_grads(model, pack(rows))
    assert abs(float(loss) - float(ref_loss)) > 1e-4


@pytest.mark.parametrize("softmax_rows", [loss_module.SOFTMAX_ROWS, 3])
def test_head_maths_matches_autograd_with_bias_scale_and_softcap(softmax_rows, monkeypatch):
    """LinearTokenLogProbs' hand-written gradients, against autograd on the plain formula, with a different
    incoming gradient for every token (as dpo/kto give) and with the summed sft loss's; 11 rows in chunks of 4, and
    with 3 rows: several softmax blocks per chunk, the last ones partial."""
    monkeypatch.setattr(loss_module, "SOFTMAX_ROWS", softmax_rows)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (11,), generator=g)
    for token_weights in (torch.randn(11, generator=g, dtype=torch.float64), -torch.ones(11, dtype=torch.float64)):
        for scale, softcap in [(1.0, None), (0.25, None), (3.0, 2.0), (1.0, 0.5)]:
            logits = torch.nn.functional.linear(hidden, weight, bias) * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            expected = torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
            expected_grads = torch.autograd.grad((expected * token_weights).sum(), (hidden, weight, bias))
            got = LinearTokenLogProbs.apply(hidden, weight, targets, 4, bias, scale, softcap)
            got_grads = torch.autograd.grad((got * token_weights).sum(), (hidden, weight, bias))
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
            for got_grad, expected_grad in zip(got_grads, expected_grads):
                torch.testing.assert_close(got_grad, expected_grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- sequence log-probs
SEQUENCE_WEIGHTS = torch.tensor([0.5, -1.0, 2.0])  # a different incoming gradient per sequence, as dpo/kto give


def plain_sequence_logps(model, rows):
    """Plain transformers (+ PEFT): log_softmax of the model's own logits on padded rows, gathered at the labels
    and summed per sequence."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])[:, 1:]
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (logps * (labels != IGNORE)).sum(1)


def phi2_config():
    """Phi-2 (not claimed): lm_head bias, partial rotary, parallel blocks."""
    from transformers import PhiConfig

    return PhiConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"})


SEQUENCE_CASES = {
    **{name: (name, "all-linear") for name in family_configs()},
    "phi2-fallback": ("phi2", "all-linear"),
    "lora-on-lm_head": ("mistral-sliding", ["q_proj", "v_proj", "lm_head"]),
}


@pytest.mark.parametrize("case", list(SEQUENCE_CASES))
def test_sequence_logps_equal_the_models_own_logits_and_gradients(case):
    """dpo/kto's sequence log-probs (policy and reference) go through the model's own head: its bias, logit scale
    and soft-cap on the fast path, the model's own forward on the fallback (Phi-2, an adapter on lm_head)."""
    name, targets = SEQUENCE_CASES[case]
    model = lora_model(phi2_config() if name == "phi2" else family_configs()[name], target_modules=targets)
    rows = examples()
    model.zero_grad()
    expected = plain_sequence_logps(model, rows)
    (expected * SEQUENCE_WEIGHTS).sum().backward()
    expected_grads = lora_grads(model)
    assert (case == "lora-on-lm_head") == any("lm_head" in n for n in expected_grads)

    packing = use_plan(model, packing=True, log=lambda *_: None)
    assert packing == (case in family_configs())
    model.zero_grad()
    logps, counts = sequence_logps(model, pack(rows) if packing else pad(rows, pad_id=0), len(rows), chunk_tokens=7)
    (logps * SEQUENCE_WEIGHTS).sum().backward()
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [sum(label != IGNORE for label in labels[1:]) for _, labels in rows]
    assert_same(logps.sum(), lora_grads(model), expected.sum(), expected_grads)


@pytest.mark.parametrize("case", ["gemma2-softcaps", "cohere-logit-scale", "phi2-fallback", "lora-on-lm_head"])
def test_cached_reference_logps_equal_the_plain_base_models(case):
    """dpo's reference (train/reference.py: the LoRA model with its adapter disabled) scores like plain
    transformers' base model, head included."""
    from tunelab.train.objectives import PairRow
    from tunelab.train.reference import reference_logps

    name, targets = SEQUENCE_CASES[case]
    config = lambda: phi2_config() if name == "phi2" else family_configs()[name]  # noqa: E731
    model = lora_model(config(), target_modules=targets)
    sequences = examples(seed=1, lengths=(9, 17, 12, 14))
    with torch.no_grad():
        expected = plain_sequence_logps(base_model(config()), sequences)
    packing = use_plan(model, packing=True, log=lambda *_: None)
    pairs = [PairRow(sequences[0], sequences[1]), PairRow(sequences[2], sequences[3])]
    got = reference_logps(model, pairs, 3, packing, 0, None, torch.device("cpu"), chunk_tokens=7)
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- fallback
def test_unknown_family_falls_back_to_the_models_own_forward_on_padded_rows():
    model = lora_model(phi2_config())
    plan = plan_for(model)
    assert not plan.fast and "phi" in plan.reason
    lines = []
    assert use_plan(model, packing=True, log=lines.append) is False
    assert len(lines) == 1 and "fallback" in lines[0] and "no packing" in lines[0]
    assert model.config._attn_implementation == "eager"  # the model's own attention is left alone
    rows = examples()
    ref_loss, ref_grads = labels_loss_and_lora_grads(model, rows)
    loss, grads = tunelab_loss_and_grads(model, pad(rows, pad_id=0))
    assert_same(loss, grads, ref_loss, ref_grads)
    with pytest.raises(ValueError, match="fallback"):
        masked_lm_loss(model, pack(rows))  # never packs conversations through a forward that cannot separate them


def test_adapter_on_lm_head_falls_back():
    model = lora_model(family_configs()["mistral-sliding"], target_modules=["q_proj", "v_proj", "lm_head"])
    plan = plan_for(model)
    assert not plan.fast and "lm_head" in plan.reason
    rows = examples()
    ref_loss, ref_grads = labels_loss_and_lora_grads(model, rows)
    assert any("lm_head" in name for name in ref_grads)
    loss, grads = tunelab_loss_and_grads(model, pad(rows, pad_id=0))
    assert_same(loss, grads, ref_loss, ref_grads)


# ---------------------------------------------------------------------------------------------- CLI
def saved_model(tmp_path, config) -> str:
    """A tiny random-init model of `config`'s family with a real chat tokenizer, saved as a local HF folder."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import tokenizer_for_tests

    tokenizer = tokenizer_for_tests()
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "name,expected", [("gemma2-softcaps", "fast path"), ("qwen2-sliding", "fast path"), ("phi2", "fallback")]
)
def test_tunelab_train_cli_step(tmp_path, name, expected):
    import json

    import yaml
    from typer.testing import CliRunner

    from tests.helpers import conversations_file
    from tunelab.cli import app

    configs = {**family_configs(), "phi2": phi2_config()}
    cfg = {
        "data": {
            "sources": [{"path": str(conversations_file(tmp_path, n=24))}],
            "output_dir": str(tmp_path / "prepared"),
            "val_fraction": 0.2,
            "dedup": {"near": False},
        },
        "model": {"name": saved_model(tmp_path, configs[name])},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "batch_size": 3,
            "save_steps": 2,
            "eval_steps": 2,
            "max_seq_len": 64,
            "warmup_steps": 0,
            "precision": "fp32",
            "threads": 1,
        },
        "eval": {"batch_size": 4, "max_val_rows": 3},
    }
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", str(config_file)])
    assert result.exit_code == 0, result.output
    lines = [line.split("architecture: ", 1)[1] for line in result.output.splitlines() if "architecture: " in line]
    assert len(lines) == 1 and expected in lines[0], result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_train_loss"] > 0 and summary["final_val_loss"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- Gemma-3 (270M shape)
GEMMA_CHATS = [
    [
        {"role": "system", "content": "Plan trips."},
        {"role": "user", "content": "Two days in Rome?"},
        {"role": "assistant", "content": "Day 1: Colosseum and Forum. Day 2: Vatican."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! Where to?"},
        {"role": "user", "content": "Lisbon, one day."},
        {"role": "assistant", "content": "Day 1: Alfama, tram 28, Belem."},
    ],
    [
        {"role": "user", "content": "Pack list for Oslo in May?"},
        {"role": "assistant", "content": "Layers, rain jacket."},
    ],
]


def gemma3_270m_shaped(vocab_size: int, window: int):
    """Gemma-3-270M's shape, shrunk: sliding layers before a full one, one KV head, the query scalar not equal to
    head_dim, separate RoPE bases for local (10k) and global (1M) layers, tied embeddings; the window binds."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=256,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=4,
        tie_word_embeddings=True,
    )


def per_conversation_loss(model, rows):
    """Plain transformers + PEFT, one conversation per forward (no padding, no packing): the token-weighted mean
    of each conversation's own loss."""
    losses, counts = [], []
    for ids, labels in rows:
        n = sum(1 for label in labels[1:] if label != IGNORE)  # the model shifts labels by one itself
        losses.append(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * n)
        counts.append(n)
    return sum(losses) / sum(counts)


def test_gemma3_packed_fast_path_equals_per_conversation_forward_on_gemma_chat_rows():
    """Rows made by tunelab's own masking with the `gemma` template (a byte-level tokenizer, so conversations are
    60-150 tokens against a 16-token window): packed fast-path loss and LoRA gradients equal plain transformers+PEFT
    run one conversation at a time."""
    from tests.helpers import tiny_gemma_like_tokenizer
    from tunelab.data.masking import encode_conversations

    tokenizer = tiny_gemma_like_tokenizer()
    encoded, _ = encode_conversations(
        tokenizer, GEMMA_CHATS, [f"c{i}" for i in range(len(GEMMA_CHATS))], 512, "truncate"
    )
    rows = [(e.input_ids, e.labels) for e in encoded]
    assert len(rows) == 3 and min(len(ids) for ids, _ in rows) > 3 * 16
    model = lora_model(gemma3_270m_shaped(len(tokenizer), window=16))
    assert plan_for(model).fast, plan_for(model).reason

    model.zero_grad()
    ref_loss = per_conversation_loss(model, rows)
    ref_loss.backward()
    ref_grads = lora_grads(model)

    assert use_plan(model, packing=True, log=lambda *_: None)
    loss, grads = tunelab_loss_and_grads(model, pack(rows))
    assert_same(loss, grads, ref_loss.detach(), ref_grads)

    # the window really binds on these rows: without it the model's own loss is different
    model.config.sliding_window = 10_000
    for module in model.modules():
        if hasattr(module, "sliding_window") and module.sliding_window:
            module.sliding_window = 10_000
    with torch.no_grad():
        assert abs(float(per_conversation_loss(model, rows)) - float(ref_loss)) > 1e-4
