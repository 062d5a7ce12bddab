"""The real Llama-3.2 tokenizer with tunelab's llama-3.1 template: labels token by token.

Assistant headers are masked, every assistant turn ends with a labelled `<|eot_id|>`, a row has exactly one
`<|begin_of_text|>`, and nothing outside the assistant turns carries a label.
"""

from __future__ import annotations

import pytest

from tests.helpers import llama32_tokenizer_dir
from tunelab.data.masking import IGNORE_INDEX, encode_conversations

CONVERSATION = [
    {"role": "system", "content": "You plan trips."},
    {"role": "user", "content": "Two days in Porto?"},
    {"role": "assistant", "content": "Day 1: Ribeira and the bridge.\nDay 2: Serralves and Foz."},
    {"role": "user", "content": "And one in Braga?"},
    {"role": "assistant", "content": "Day 1: Bom Jesus and the old town."},
]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    folder = str(llama32_tokenizer_dir())  # a tokenizer-only folder: no model config beside it
    return load_tokenizer(ModelConfig(name=folder, chat_template="llama-3.1"), model_path=folder)


def test_llama32_tokenizer_has_the_llama3_special_tokens(llama3_tokenizer):
    ids = [
        llama3_tokenizer.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>")
    ]
    assert ids == [128000, 128006, 128009] and len(llama3_tokenizer) >= 128256


def test_labels_cover_exactly_the_assistant_replies_and_their_eot(llama3_tokenizer):
    tok = llama3_tokenizer
    [row], stats = encode_conversations(tok, [CONVERSATION], ["porto#0"], 512, "truncate")
    bos, eot, header = (
        tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>")
    )

    assert row.input_ids.count(bos) == 1 and row.input_ids[0] == bos and row.labels[0] == IGNORE_INDEX
    assert stats.boundary_mismatch == 0  # the per-segment ids equal tokenising the whole rendered text

    # labelled runs, independently of masking.py: split the row at <|start_header_id|> into turns
    turns, current = [], []
    for token, label in zip(row.input_ids[1:], row.labels[1:]):
        if token == header and current:
            turns.append(current)
            current = []
        current.append((token, label))
    turns.append(current)
    roles = [tok.decode([t for t, _ in turn[1:3]]).strip() for turn in turns]
    assert [r.split("<|end_header_id|>")[0] for r in roles] == ["system", "user", "assistant", "user", "assistant"]

    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    for turn, role in zip(turns, roles):
        labelled = [t for t, label in turn if label != IGNORE_INDEX]
        if not role.startswith("assistant"):
            assert labelled == []  # system and user turns: nothing labelled, not even their <|eot_id|>
            continue
        header_part = [label for t, label in turn[:4]]  # <|start_header_id|> assistant <|end_header_id|> \n\n
        assert header_part == [IGNORE_INDEX] * 4
        assert labelled[-1] == eot and labelled.count(eot) == 1
        assert tok.decode(labelled) == replies.pop(0) + "<|eot_id|>"
    assert replies == []
    assert all(label == token for token, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX)
