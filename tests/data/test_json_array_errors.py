"""A syntax error inside one record of a JSON array costs that record only: the reader reports it (file, record
index, line), reads every later record, and holds a bounded window of text while doing so."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_config, qa_rows
from tunelab.data import readers
from tunelab.data.prepare import DataPipeline
from tunelab.data.problems import ProblemLog

WINDOW = 2048  # characters per read: small, so the file is many windows long


@pytest.fixture
def small_window(monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_CHARS", WINDOW)


def array_text(records: list[dict]) -> tuple[str, list[int]]:
    """A pretty-printed JSON array and the offset where each record starts (as json.dumps(indent=2) writes it)."""
    parts, starts, offset = ["[\n"], [], 2
    for i, record in enumerate(records):
        body = "  " + json.dumps(record, indent=2).replace("\n", "\n  ")
        starts.append(offset)
        tail = ",\n" if i < len(records) - 1 else "\n]\n"
        parts += [body, tail]
        offset += len(body) + len(tail)
    return "".join(parts), starts


def break_record(text: str, starts: list[int], index: int, old: str, new: str) -> str:
    """Replace the first `old` inside record `index` by `new`."""
    at = text.index(old, starts[index])
    assert at < starts[index + 1]
    return text[:at] + new + text[at + len(old) :]


def read_file(path):
    log, stats = ProblemLog(), readers.FileStats(path.name)
    ctx = readers.ReadContext(str(path), "s", log, 200_000, stats)
    return list(readers.iter_file(path, ctx)), log, stats


def first_message(record: dict) -> str:
    return record["conversations"][0]["value"]


@pytest.mark.parametrize(
    "old, new, what",
    [
        ('"from": "gpt"', '"from" "gpt"', "missing colon"),
        ('"from": "gpt"', '"from": gpt', "bare word"),
        ('"human"', '"human', "unterminated string"),
        ('"from": "gpt"', '"from": "gpt",', "trailing comma"),
        ('"value": "', '"value" "{[[{ ', "brackets inside a string"),
    ],
)
def test_broken_record_is_skipped_and_every_later_record_is_read(tmp_path, small_window, old, new, what):
    records = qa_rows(200)
    text, starts = array_text(records)
    broken = 7
    path = tmp_path / "broken.json"
    path.write_text(break_record(text, starts, broken, old, new), encoding="utf-8")

    got, log, stats = read_file(path)

    expected = [first_message(r) for i, r in enumerate(records) if i != broken]
    assert [first_message(r.value) for r in got] == expected, what
    line = text.count("\n", 0, starts[broken]) + 1
    assert log.dropped.to_json() == {"malformed_json": {"count": 1, "first": [f"{path}#{broken} (line {line})"]}}
    assert stats.records == len(records) and stats.unparsed_bytes == 0
    # Bounded memory: the reader never held more than two windows and one record, though the file is far longer.
    longest = max(b - a for a, b in zip(starts, starts[1:]))
    assert stats.peak_buffer_chars <= 2 * (WINDOW + longest)
    assert len(text) > 20 * (WINDOW + longest)


def test_later_good_records_keep_their_line_locations(tmp_path, small_window):
    records = qa_rows(60)
    text, starts = array_text(records)
    path = tmp_path / "b.json"
    path.write_text(break_record(text, starts, 3, '"from": "gpt"', '"from" "gpt"'), encoding="utf-8")
    got, _, _ = read_file(path)
    assert [r.where for r in got] == [f"{path}:{text.count(chr(10), 0, s) + 1}" for i, s in enumerate(starts) if i != 3]


def test_broken_record_and_truncated_tail_are_both_reported(tmp_path, small_window):
    records = qa_rows(50)
    text, starts = array_text(records)
    text = break_record(text, starts, 10, '"from": "gpt"', '"from": gpt')
    cut = starts[49] + 40  # the file ends inside the last record
    path = tmp_path / "t.json"
    path.write_text(text[:cut], encoding="utf-8")
    got, log, stats = read_file(path)
    assert len(got) == 48
    dropped = log.dropped.to_json()
    assert dropped["malformed_json"]["count"] == 1 and dropped["unparsed_tail"]["count"] == 1
    assert stats.unparsed_bytes == len(text[starts[49] : cut].encode())


def test_over_long_record_is_skipped_window_by_window(tmp_path, small_window):
    """A record longer than data.max_record_chars is never held whole: peak text stays near the window size."""
    records = qa_rows(40)
    records[5]["conversations"][1]["value"] = "word [ { " * 20_000  # 180k characters, brackets inside the text
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    log, stats = ProblemLog(), readers.FileStats(path.name)
    ctx = readers.ReadContext(str(path), "s", log, 5_000, stats)
    got = list(readers.iter_file(path, ctx))
    assert [first_message(r.value) for r in got] == [first_message(r) for i, r in enumerate(records) if i != 5]
    assert log.dropped.counts == {"too_long": 1}
    assert stats.peak_buffer_chars <= 2 * (WINDOW + 5_000)


def test_pipeline_counts_the_broken_record_and_keeps_the_rest(tmp_path):
    records = qa_rows(30)
    text, starts = array_text(records)
    path = tmp_path / "p.json"
    path.write_text(break_record(text, starts, 0, '"from": "human"', '"from": "human" "x"'), encoding="utf-8")
    pipeline = DataPipeline(make_config(tmp_path, [{"path": str(path)}]))
    rows = pipeline.read_all()
    assert len(rows) == 29
    assert pipeline.counts[path.name].records_read == 30
    assert pipeline.log.dropped.to_json()["malformed_json"]["first"] == [f"{path}#0 (line 2)"]
