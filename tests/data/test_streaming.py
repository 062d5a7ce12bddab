"""Bounded work at any data size: `prepare` pulls records from the file only as fast as it tokenises and writes
them (a chunk at a time), near-dedup and the split give the same rows as the list-based reference, and training
reads prepared rows from the memory-mapped Arrow data instead of Python lists."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_config, qa_rows, write_jsonl
from tunelab.data import dedup, prepare, readers
from tunelab.data.prepare import TokenRows, load_prepared, prepare_dataset
from tunelab.data.split import is_validation

CHUNK = 16


def counting_reader(monkeypatch) -> list[int]:
    """Patch the file reader to count the records it has handed out; returns the live counter [n]."""
    handed_out = [0]
    original = readers.iter_file

    def iter_file(path, ctx):
        for record in original(path, ctx):
            handed_out[0] += 1
            yield record

    monkeypatch.setattr(readers, "iter_file", iter_file)
    return handed_out


def openai_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": r["conversations"][0]["value"]},
                {"role": "assistant", "content": r["conversations"][1]["value"]},
            ]
        }
        for r in qa_rows(n)
    ]


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=50)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prepare_reads_records_only_as_fast_as_it_encodes_them(tmp_path, monkeypatch, chatml_tokenizer, fmt):
    records = openai_rows(200)
    path = (
        write_jsonl(tmp_path / "d.jsonl", records) if fmt == "jsonl" else write_parquet(tmp_path / "d.parquet", records)
    )
    monkeypatch.setattr(prepare, "ENCODE_CHUNK", CHUNK)
    handed_out = counting_reader(monkeypatch)
    read_at_encode = []
    original_encode = prepare.encode_conversations

    def encode(tokenizer, conversations, *args, **kwargs):
        read_at_encode.append((handed_out[0], len(conversations)))
        return original_encode(tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(prepare, "encode_conversations", encode)
    pipeline = prepare.DataPipeline(make_config(tmp_path, [{"path": str(path)}]), tokenizer=chatml_tokenizer)
    pipeline.run(tmp_path / "out")

    # Every record is distinct and valid, so after the k-th chunk exactly k*CHUNK records have been read:
    # the reader is never ahead of the encoder by more than one chunk.
    assert [n for n, _ in read_at_encode] == [CHUNK * (k + 1) for k in range(len(read_at_encode) - 1)] + [200]
    assert all(size == CHUNK for _, size in read_at_encode[:-1])
    train, val = load_prepared_splits(tmp_path / "out")
    assert len(train) + len(val) == 200


def load_prepared_splits(folder):
    import datasets

    return datasets.load_from_disk(str(folder / "train")), datasets.load_from_disk(str(folder / "val"))


def test_streamed_prepare_keeps_the_rows_dedup_and_split_of_the_reference(tmp_path, chatml_tokenizer, monkeypatch):
    """Near duplicates removed (first wins), exact duplicates removed, val iff hash(id) < val_fraction, order kept;
    computed independently from the written rows' messages."""
    base = openai_rows(60)
    near = json.loads(json.dumps(base[10]))
    near["messages"][1]["content"] += " indeed"  # one extra word: a near duplicate of row 10
    records = base + [base[3], near]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    monkeypatch.setattr(prepare, "ENCODE_CHUNK", 7)  # chunk edges fall inside the data
    cfg = make_config(tmp_path, [{"path": str(path)}], dedup={"near": True, "threshold": 0.7}, val_fraction=0.2)
    folder = prepare_dataset(cfg)
    train, val = load_prepared(folder)

    report = json.loads((folder / "report.json").read_text())
    assert report["duplicates"]["exact"]["count"] == 1 and report["duplicates"]["near"]["count"] == 1
    kept = [json.loads(m) for m in train["messages"]] + [json.loads(m) for m in val["messages"]]
    assert sorted(map(json.dumps, kept)) == sorted(json.dumps(r["messages"]) for r in base)
    assert train["messages"] == [
        json.dumps(r["messages"], ensure_ascii=False)
        for r in base
        if not is_validation(dedup.content_id(r["messages"]), 0.2)
    ]
    assert all(is_validation(i, 0.2) for i in val["id"])


def test_training_rows_are_read_from_the_memory_mapped_arrow_data(tmp_path, chatml_tokenizer):
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", openai_rows(600))
    train, _ = load_prepared(prepare_dataset(make_config(tmp_path, [{"path": str(path)}])))
    assert isinstance(train.data, datasets.table.MemoryMappedTable)

    allocated = pa.total_allocated_bytes()
    rows = TokenRows(train)
    picked = [rows[i] for i in (0, 7, len(rows) - 1)] + list(rows[5:8])
    # Indexing reads single rows straight from the mapped file: Arrow allocates nothing for the table.
    assert pa.total_allocated_bytes() - allocated < 16 * 1024 < train.data.nbytes // 10
    expected = [(train[i]["input_ids"], train[i]["labels"]) for i in (0, 7, len(train) - 1, 5, 6, 7)]
    assert picked == expected
    assert len(rows) == len(train) and len(rows[10:20]) == 10 and rows[-1] == rows[len(rows) - 1]
