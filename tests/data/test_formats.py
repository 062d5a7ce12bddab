"""One test per input format: each becomes the same canonical conversation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import make_config, write_json, write_jsonl
from tunelab.data.prepare import DataPipeline

EXPECTED = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


def read_rows(tmp_path, path, **source):
    pipeline = DataPipeline(make_config(tmp_path, [{"path": str(path), **source}]))
    return pipeline, pipeline.read_all()


def test_sharegpt_json(tmp_path):
    path = write_json(
        tmp_path / "a.json",
        [
            {
                "id": "x",
                "conversations": [
                    {"from": "system", "value": "Be exact."},
                    {"from": "human", "value": "What is 2+2?"},
                    {"from": "gpt", "value": "It is 4."},
                ],
            }
        ],
    )
    _, rows = read_rows(tmp_path, path)
    assert [r.messages for r in rows] == [[{"role": "system", "content": "Be exact."}, *EXPECTED]]


def test_sharegpt_assistant_names_map_to_assistant(tmp_path):
    records = [
        {"conversations": [{"from": "user", "value": "What is 2+2?"}, {"from": name, "value": "It is 4."}]}
        for name in ("chatgpt", "bing", "bard", "assistant")
    ]
    # distinct system prompts keep the four rows apart for exact dedup
    for i, r in enumerate(records):
        r["system"] = f"variant {i}"
    _, rows = read_rows(tmp_path, write_json(tmp_path / "b.json", records))
    assert [r.messages[1:] for r in rows] == [EXPECTED] * 4


def test_openai_messages_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                    {"role": "assistant", "content": "It is 4."},
                ]
            }
        ],
    )
    _, rows = read_rows(tmp_path, path)
    assert [r.messages for r in rows] == [EXPECTED]
    assert rows[0].where.endswith("a.jsonl:1")


def test_alpaca_yaml(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("- instruction: Add the numbers.\n  input: 2+2\n  output: '4'\n", encoding="utf-8")
    _, rows = read_rows(tmp_path, path)
    assert rows[0].messages == [
        {"role": "user", "content": "Add the numbers.\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]


def test_prompt_response_and_question_answer_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "What is 2+2?", "response": "It is 4.", "question": None, "answer": None}]),
        path,
    )
    other = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "What is 3+3?", "answer": "Six."}]), other)
    _, rows = read_rows(tmp_path, tmp_path)  # a folder of files
    assert [r.messages for r in rows] == [
        EXPECTED,
        [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "Six."}],
    ]


def test_chatterbot_yaml_lists_alternate_and_keep_yaml_words_as_text(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        "categories:\n- x\nconversations:\n- - Is it on?\n  - Yes\n  - Really?\n  - 42\n- - Hi\n  - Hello\n  - Bye\n",
        encoding="utf-8",
    )
    pipeline, rows = read_rows(tmp_path, path)
    assert rows[0].messages == [
        {"role": "user", "content": "Is it on?"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "42"},
    ]
    # odd length: the unanswered last line is removed and counted as a repair
    assert rows[1].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert pipeline.log.repaired.counts["dropped_trailing_user"] == 1


def test_normalization_nfc_and_whitespace(tmp_path):
    path = write_json(
        tmp_path / "n.json",
        [
            {
                "conversations": [
                    {"from": "human", "value": "  Cafe\u0301 \r\nmenu\u200b?  \n\n\n\nplease "},
                    {"from": "gpt", "value": "Sure.\t\n"},
                ]
            }
        ],
    )
    _, rows = read_rows(tmp_path, path)
    assert rows[0].messages[0]["content"] == "Caf\u00e9\nmenu?\n\nplease"
    assert rows[0].messages[1]["content"] == "Sure."


def test_keywords_keep_only_matching_conversations(tmp_path):
    path = write_json(
        tmp_path / "k.json",
        [
            {
                "conversations": [
                    {"from": "human", "value": "Plan a trip to Rome"},
                    {"from": "gpt", "value": "Day 1: ..."},
                ]
            },
            {
                "conversations": [
                    {"from": "human", "value": "Strip the string"},
                    {"from": "gpt", "value": "Use .strip()"},
                ]
            },
        ],
    )
    pipeline, rows = read_rows(tmp_path, path, keywords=["trip"])
    assert [r.messages[0]["content"] for r in rows] == ["Plan a trip to Rome"]  # whole words: "Strip" is no match
    assert pipeline.log.dropped.counts["no_keyword"] == 1
