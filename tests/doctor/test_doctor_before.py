"""The pre-training checks: each fails on a deliberately broken input and passes on a good one.

The data is real (`prepare_dataset` on a small JSONL), the model a tiny random Llama with the embedded SmolLM2
tokenizer wrapped by PEFT as `tunelab train` builds it. Expected figures come from the tokenizer, PEFT or
transformers directly (header token counts, PEFT's own adapter and parameter counts, transformers' collator).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import conversations_file, save_tiny_llama_with_embedded_tokenizer
from tunelab.config import config_from_dict
from tunelab.doctor.before import (
    EXAMPLE,
    check_bos,
    check_labels,
    check_lora,
    check_packing,
    check_pad,
    check_quantisation,
    check_template,
    doctor_config,
    preflight_of,
)
from tunelab.doctor.report import FAIL, PASS, WARN
from tunelab.models.templates import TEMPLATE_DIR

CHATML = (TEMPLATE_DIR / "chatml.jinja").read_text()
# No assistant marker at all: messages one after another, nothing says who speaks or where a turn ends.
NO_MARKERS = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
# ChatML whose add_generation_prompt writes no assistant header: the header is then rendered with the reply.
NO_GENERATION_HEADER = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
)
DOUBLE_BOS = "{{ bos_token }}" + CHATML  # SmolLM2's BOS is <|im_start|>, which ChatML already starts with


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor-before")
    save_tiny_llama_with_embedded_tokenizer(root / "model")
    return root, conversations_file(root, n=24)


def make_cfg(root, data_file, name: str, template: str = CHATML, **sections):
    template_file = root / f"{name}.jinja"
    template_file.write_text(template)
    raw = {
        "data": {
            "sources": [{"path": str(data_file)}],
            "val_fraction": 0.2,
            "dedup": {"near": False},
            "output_dir": str(root / f"prepared-{name}"),
        },
        "model": {"name": str(root / "model"), "chat_template": str(template_file)},
        "lora": {"r": 4, "alpha": 8},
        "train": {"output_dir": str(root / f"run-{name}"), "max_seq_len": 64, "precision": "fp32", "threads": 1},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)


def preflight(workspace, name: str, template: str = CHATML, **sections):
    from tunelab.data.prepare import prepare_dataset
    from tunelab.models import load_tokenizer
    from tunelab.train.precision import Precision
    from tunelab.train.recipe import build_lora_model

    root, data_file = workspace
    cfg = make_cfg(root, data_file, name, template, **sections)
    tokenizer = load_tokenizer(cfg.model)
    model = build_lora_model(cfg, Precision("fp32", "test"))
    return preflight_of(cfg, prepare_dataset(cfg), tokenizer, model)


@pytest.fixture(scope="module")
def good(workspace):
    return preflight(workspace, "good")


# ------------------------------------------------------------------------------------------ labels
def test_labels_pass_when_only_replies_and_their_turn_end_are_trained(good):
    result = check_labels(good)
    assert result.status == PASS, result
    replies = sum(m["role"] == "assistant" for conversation in good.messages for m in conversation)
    assert f"{replies}/{replies} replies end with a trained <|im_end|>" in result.evidence
    assert "; 0 of " in result.evidence


def test_labels_fail_when_the_template_has_no_assistant_markers(workspace):
    p = preflight(workspace, "no-markers", NO_MARKERS)
    result = check_labels(p)
    assert result.status == FAIL
    replies = sum(m["role"] == "assistant" for conversation in p.messages for m in conversation)
    assert f"0/{replies} replies end with a trained" in result.evidence
    assert check_template(p).status == FAIL  # and the template check says why


def test_labels_count_the_assistant_header_trained_with_the_reply(workspace):
    p = preflight(workspace, "no-header", NO_GENERATION_HEADER)
    result = check_labels(p)
    header = len(p.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])  # 3 tokens
    replies = sum(m["role"] == "assistant" for conversation in p.messages for m in conversation)
    assert result.status == FAIL
    assert f"{header * replies} of " in result.evidence, result.evidence


# ----------------------------------------------------------------------------------- special tokens
def test_bos_passes_with_one_and_fails_with_a_double_bos_template(good, workspace):
    assert check_bos(good).status == PASS
    assert all(ids[0] == good.tokenizer.bos_token_id != ids[1] for ids, _ in good.rows)
    p = preflight(workspace, "double-bos", DOUBLE_BOS)
    assert all(ids[:2] == [p.tokenizer.bos_token_id] * 2 for ids, _ in p.rows)  # what the rows really hold
    result = check_bos(p)
    assert result.status == FAIL and f"{len(p.rows)} rows with 2" in result.evidence


def test_pad_equal_to_turn_end_fails_under_a_collator_that_masks_pad_ids(good):
    from transformers import DataCollatorForLanguageModeling

    tokenizer = good.tokenizer
    assert tokenizer.pad_token_id in good.turn_ends  # SmolLM2: pad = <|im_end|>, the turn end

    def transformers_collator(rows):
        batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": ids} for ids, _ in rows])
        return batch["labels"].tolist()

    # the independent fact: transformers' causal-LM collator turns every pad id, so every turn end, into -100
    ids = good.rows[0][0]
    assert tokenizer.pad_token_id in ids and -100 in transformers_collator([good.rows[0]])[0][: len(ids)]
    failed = check_pad(good, collate=transformers_collator)
    assert failed.status == FAIL and " 0/" in failed.evidence
    passed = check_pad(good)  # tunelab's batches mask padding by position
    assert passed.status == PASS
    kept, wanted = passed.evidence.split("trains ")[1].split(" ")[0].split("/")
    assert kept == wanted and int(wanted) > 0


# ---------------------------------------------------------------------------------------- template
def test_template_names_where_the_configured_one_differs_from_the_tokenizers_own(workspace):
    zephyr = (TEMPLATE_DIR / "zephyr.jinja").read_text()
    p = preflight(workspace, "zephyr", zephyr)
    result = check_template(p)
    render = lambda template: p.tokenizer.apply_chat_template(  # noqa: E731
        EXAMPLE, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    own, configured = render(p.own_template), render(p.tokenizer.chat_template)
    assert result.status == WARN and own != configured
    assert f"at character {len(os.path.commonprefix([own, configured]))} " in result.evidence


# ----------------------------------------------------------------------------------------- packing
def test_packing_passes_on_the_packed_attention_and_fails_when_conversations_see_each_other(good):
    from tunelab.train.architectures import causal_lm

    result = check_packing(good)
    assert result.status == PASS and "packed attention" in result.evidence
    config = causal_lm(good.model).config
    packed = config._attn_implementation
    config._attn_implementation = "sdpa"  # the model's own attention on a packed row: one causal sequence
    try:
        broken = check_packing(good)
    finally:
        config._attn_implementation = packed
    assert broken.status == FAIL, broken


# -------------------------------------------------------------------------------------------- lora
def test_lora_counts_adapters_as_peft_does_and_sees_every_gradient(good):
    from peft.tuners.lora import LoraLayer

    result = check_lora(good)
    adapters = sum(isinstance(m, LoraLayer) for m in good.model.modules())
    trainable, _ = good.model.get_nb_trainable_parameters()
    assert result.status == PASS, result
    assert f"{adapters}/{adapters} adapters get a gradient" in result.evidence
    assert f"{trainable:,} trainable parameters" in result.evidence and "no adapter on lm_head" in result.evidence
    assert all(p.grad is None for p in good.model.parameters())  # the check leaves no gradient behind


def test_lora_fails_on_targets_that_match_nothing(workspace):
    root, data_file = workspace
    report = doctor_config(make_cfg(root, data_file, "no-target", lora={"target_modules": ["no_such_proj"]}))
    by_name = {c.name: c for c in report.checks}
    assert by_name["lora"].status == FAIL and "no_such_proj" in by_name["lora"].evidence
    assert report.exit_code == 2


def test_lora_fails_on_frozen_adapters(good):
    frozen = [p for name, p in good.model.named_parameters() if "layers.0.self_attn.q_proj.lora_" in name]
    for p in frozen:
        p.requires_grad_(False)  # what a dtype cast of the adapter weights does to them
    try:
        result = check_lora(good)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    assert result.status == FAIL and "layers.0.self_attn.q_proj" in result.evidence


# ------------------------------------------------------------------------------------ quantisation
def test_quantisation_fails_when_load_in_4bit_left_every_layer_full_precision(good):
    assert check_quantisation(good).status == PASS  # off: nothing to check
    cfg = good.cfg.model_copy(update={"model": good.cfg.model.model_copy(update={"load_in_4bit": True})})
    asked = type(good)(**{**vars(good), "cfg": cfg})
    result = check_quantisation(asked)
    assert result.status == FAIL and result.evidence.startswith("0 linear layers are Linear4bit")


def test_quantisation_sees_bitsandbytes_4bit_layers(good):
    bnb = pytest.importorskip("bitsandbytes")
    from tunelab.train.architectures import causal_lm

    cfg = good.cfg.model_copy(update={"model": good.cfg.model.model_copy(update={"load_in_4bit": True})})
    layer = causal_lm(good.model).model.layers[0].mlp
    plain = layer.down_proj.base_layer
    quantised = bnb.nn.Linear4bit(plain.in_features, plain.out_features, bias=False, quant_type="nf4")
    quantised.weight = bnb.nn.Params4bit(plain.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.down_proj.base_layer = quantised.to("cpu")
    try:
        result = check_quantisation(type(good)(**{**vars(good), "cfg": cfg}))
    finally:
        layer.down_proj.base_layer = plain
    assert result.status == PASS and result.evidence.startswith("1 linear layers are Linear4bit")
    assert torch.equal(layer.down_proj.base_layer.weight, plain.weight)
