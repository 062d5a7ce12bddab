"""Every kind of bad input: per-record problems are skipped and counted with locations; file-level problems raise
one-line DataErrors; on_error=fail stops at the first problem; a failed prepare leaves no output folder."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_config, qa_rows, sharegpt, write_json, write_jsonl
from tunelab.data.prepare import DataPipeline, prepare_dataset
from tunelab.data.problems import DataError

GOOD = sharegpt("What is the capital of France?", "Paris.")


def read(tmp_path, path, **data):
    pipeline = DataPipeline(make_config(tmp_path, [{"path": str(path)}], **data))
    rows = pipeline.read_all()
    return pipeline, rows


def dropped(pipeline, reason):
    info = pipeline.log.dropped.to_json().get(reason)
    assert info is not None, f"no `{reason}` in {pipeline.log.dropped.to_json()}"
    return info


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_malformed_jsonl_lines_are_skipped_with_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n\n" + json.dumps(qa_rows(1)[0]) + "\n[1, 2\n", encoding="utf-8")
    pipeline, rows = read(tmp_path, path)
    assert len(rows) == 2
    info = dropped(pipeline, "malformed_json")
    assert info == {"count": 2, "first": [f"{path}:2", f"{path}:5"]}


def test_truncated_json_array_recovers_complete_records_and_counts_the_tail(tmp_path):
    records = qa_rows(3)
    text = json.dumps(records, indent=2)
    cut = text.index(records[2]["conversations"][0]["value"]) + 10  # inside record 3's first message
    path = tmp_path / "t.json"
    path.write_text(text[:cut], encoding="utf-8")
    pipeline, rows = read(tmp_path, path)
    assert [r.messages[0]["content"] for r in rows] == [
        records[0]["conversations"][0]["value"],
        records[1]["conversations"][0]["value"],
    ]
    tail_start = text.rindex("{", 0, cut)
    tail_start = text.rindex("{", 0, tail_start)  # the record's opening brace (before the message object)
    counts = pipeline.counts[path.name]
    assert counts.unparsed_bytes == len(text[tail_start:cut].encode())
    line = text.count("\n", 0, tail_start) + 1
    assert dropped(pipeline, "unparsed_tail")["first"] == [f"{path}:{line}"]


def test_empty_file_is_a_file_level_error(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read(tmp_path, path)
    assert one_line(exc) == f"{path}: empty file"


def test_empty_json_array_is_an_error(tmp_path):
    path = write_json(tmp_path / "e.json", [])
    with pytest.raises(DataError, match="empty file"):
        read(tmp_path, path)


def test_missing_and_wrong_typed_fields(tmp_path):
    path = write_json(
        tmp_path / "f.json",
        [
            GOOD,
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},  # missing value
            {"conversations": "not a list"},  # wrong type
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # wrong type
            {"instruction": "Say hi", "input": ""},  # missing output -> no known format
            42,  # not a record
        ],
    )
    pipeline, rows = read(tmp_path, path)
    assert len(rows) == 1
    assert dropped(pipeline, "missing_field")["count"] == 1
    assert dropped(pipeline, "wrong_type")["count"] == 2
    assert dropped(pipeline, "unknown_format")["count"] == 1
    assert dropped(pipeline, "not_a_record")["count"] == 1


def test_file_with_only_unknown_format_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "hello", "label": 1}, {"text": "bye", "label": 0}])
    with pytest.raises(DataError) as exc:
        read(tmp_path, path)
    assert one_line(exc).startswith(f"{path}: unknown format")
    assert "label, text" in str(exc.value)


def test_unknown_roles_empty_messages_assistant_first(tmp_path):
    path = write_json(
        tmp_path / "r.json",
        [
            GOOD,
            {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "   "}]},
            {
                "conversations": [
                    {"from": "gpt", "value": "Hello!"},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Yes?"},
                ]
            },
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "system", "value": "late"},
                    {"from": "gpt", "value": "x"},
                ]
            },
        ],
    )
    pipeline, rows = read(tmp_path, path)
    assert len(rows) == 1
    for reason in ("unknown_role", "empty_message", "starts_with_assistant", "misplaced_system"):
        assert dropped(pipeline, reason)["count"] == 1


def test_repeated_roles_are_merged(tmp_path):
    path = write_json(
        tmp_path / "m.json",
        [
            {
                "conversations": [
                    {"from": "human", "value": "Part one."},
                    {"from": "human", "value": "Part two."},
                    {"from": "gpt", "value": "Answer."},
                ]
            }
        ],
    )
    pipeline, rows = read(tmp_path, path)
    assert rows[0].messages == [
        {"role": "user", "content": "Part one.\n\nPart two."},
        {"role": "assistant", "content": "Answer."},
    ]
    assert pipeline.log.repaired.to_json()["merged_repeated_role"] == {"count": 1, "first": [f"{path}:2"]}


def test_non_utf8_bytes_skip_the_record(tmp_path):
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "ok"}\n')
    pipeline, rows = read(tmp_path, jsonl)
    assert len(rows) == 1 and dropped(pipeline, "invalid_utf8")["first"] == [f"{jsonl}:2"]

    array = tmp_path / "b.json"
    array.write_bytes(b'[{"prompt": "caf\xe9", "response": "ok"},\n' + json.dumps(GOOD).encode() + b"]")
    pipeline, rows = read(tmp_path, array)
    assert len(rows) == 1 and dropped(pipeline, "invalid_utf8")["first"] == [f"{array}:1"]


def test_utf16_file_is_a_file_level_error(tmp_path):
    path = tmp_path / "w.json"
    path.write_bytes(json.dumps([GOOD]).encode("utf-16"))
    with pytest.raises(DataError) as exc:
        read(tmp_path, path)
    assert one_line(exc).startswith(f"{path}: not UTF-8 text")


def test_ten_megabyte_string_is_skipped_in_bounded_memory(tmp_path):
    import tracemalloc

    huge = sharegpt("x" * 10_000_000, "ok")
    for name, writer in (("h.jsonl", write_jsonl), ("h.json", write_json)):
        path = writer(tmp_path / name, [GOOD, huge])
        tracemalloc.start()
        try:
            pipeline, rows = read(tmp_path, path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(rows) == 1 and dropped(pipeline, "too_long")["count"] == 1
        assert peak < 5 * 10_000_000, f"{name}: {peak / 1e6:.0f} MB held to skip a 10 MB record"


def test_all_rows_filtered_out_is_an_error(tmp_path):
    path = write_json(tmp_path / "s.json", qa_rows(3))
    with pytest.raises(DataError) as exc:
        read(tmp_path, path, min_turns=4)
    assert one_line(exc) == f"{path}: all 3 rows were filtered out (too_few_turns 3)"


def test_on_error_fail_stops_at_the_first_problem(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read(tmp_path, path, on_error="fail")
    message = one_line(exc)
    assert message.startswith(f"{path}:2: not valid JSON") and "on_error=fail" in message


def test_on_error_fail_does_not_stop_on_filters(tmp_path):
    path = write_json(tmp_path / "k.json", [GOOD, sharegpt("Plan a trip", "Go to Rome.")])
    pipeline = DataPipeline(make_config(tmp_path, [{"path": str(path), "keywords": ["trip"]}], on_error="fail"))
    assert len(pipeline.read_all()) == 1
    assert pipeline.log.dropped.counts["no_keyword"] == 1


def test_failed_prepare_leaves_no_output_folder(tmp_path):
    good = write_json(tmp_path / "good.json", qa_rows(4))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n", encoding="utf-8")
    cfg = make_config(tmp_path, [{"path": str(good)}, {"path": str(bad)}])
    with pytest.raises(DataError, match="no line is valid JSON"):
        prepare_dataset(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.json"]


def test_unsupported_and_missing_paths(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type `.csv`"):
        read(tmp_path, csv)
    with pytest.raises(DataError, match="file not found"):
        read(tmp_path, tmp_path / "nope.json")


def test_offline_hub_dataset_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = make_config(tmp_path, [{"preset": "someone/not-cached-dataset"}])
    with pytest.raises(DataError) as exc:
        DataPipeline(cfg).read_all()
    assert "HF_HUB_OFFLINE=1" in one_line(exc) and "someone/not-cached-dataset" in str(exc.value)
