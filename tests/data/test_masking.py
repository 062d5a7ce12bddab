"""Labels only on assistant tokens, checked token by token, for ChatML (SmolLM2's own) and Llama 3.1 templates."""

from __future__ import annotations

import pytest

from tests.helpers import CONVERSATION
from tunelab.data.masking import IGNORE_INDEX, Encoded, encode_conversations
from tunelab.models.templates import TemplateError

END_TOKENS = {"chatml": "<|im_end|>", "llama": "<|eot_id|>"}


def label_runs(encoded: Encoded) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token  # a label is always the token at that position (the model shifts itself)
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["chatml", "llama"])
def test_only_assistant_content_and_end_token_are_labelled(template, chatml_tokenizer, llama_tokenizer):
    tokenizer = chatml_tokenizer if template == "chatml" else llama_tokenizer
    [encoded], _ = encode_conversations(tokenizer, [CONVERSATION], ["t#0"], 512, "truncate")
    end = END_TOKENS[template]
    runs = label_runs(encoded)
    assert [tokenizer.decode(run) for run in runs] == [
        m["content"] + end for m in CONVERSATION if m["role"] == "assistant"
    ]
    # token by token: every unlabelled token belongs to the template, the system or the user text
    masked = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX])
    for message in CONVERSATION:
        assert (message["content"] in masked) == (message["role"] != "assistant")
    # the whole row is exactly the rendered conversation, ending with the end-of-turn token
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False).rstrip()
    assert tokenizer.decode(encoded.input_ids) == rendered
    assert rendered.endswith(end)


def test_chatml_ids_match_whole_text_tokenisation(chatml_tokenizer):
    results, stats = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], 512, "truncate")
    whole = chatml_tokenizer(
        chatml_tokenizer.apply_chat_template(CONVERSATION, tokenize=False).rstrip(), add_special_tokens=False
    )
    assert results[0].input_ids == whole["input_ids"]
    assert stats.verified == 1 and stats.boundary_mismatch == 0


def test_truncate_keeps_whole_exchanges(chatml_tokenizer):
    [full], _ = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], 512, "truncate")
    [cut], stats = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], len(full.input_ids) - 1, "truncate")
    assert cut.truncated and stats.truncated == 1
    assert cut.messages == CONVERSATION[:3]
    assert [chatml_tokenizer.decode(r) for r in label_runs(cut)] == ["The capital of France is Paris.<|im_end|>"]
    assert full.input_ids[: len(cut.input_ids)] == cut.input_ids


def test_first_exchange_too_long_and_drop_policy(chatml_tokenizer):
    [full], _ = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], 512, "truncate")
    [problem], _ = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], 20, "truncate")
    assert problem.reason == "first_turn_too_long"
    [problem], _ = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], len(full.input_ids) - 1, "drop")
    assert problem.reason == "over_max_seq_len"
    [fits], _ = encode_conversations(chatml_tokenizer, [CONVERSATION], ["t#0"], len(full.input_ids), "drop")
    assert fits.input_ids == full.input_ids and not fits.truncated


def test_long_reply_over_budget_is_cut_short_without_tokenising_it_all(chatml_tokenizer):
    long = [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": "word " * 200_000}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    results, stats = encode_conversations(chatml_tokenizer, [long, short], ["a", "b"], 256, "truncate")
    assert results[0].reason == "first_turn_too_long"
    assert label_runs(results[1]) and results[1].messages == short


def test_template_that_is_not_prefix_stable_is_rejected(chatml_tokenizer, tmp_path):
    import copy

    tokenizer = copy.deepcopy(chatml_tokenizer)
    # Renders only the last message: a k-message prefix is never a prefix of the (k+1)-message rendering.
    tokenizer.chat_template = (
        "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}\n"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="not prefix-stable at t#0"):
        encode_conversations(tokenizer, [CONVERSATION], ["t#0"], 512, "truncate")
