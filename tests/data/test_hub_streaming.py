"""`streaming: true` on a Hub dataset source: records come through `datasets.load_dataset(..., streaming=True)`
one at a time, with the same per-record problem reporting (`id#index`). Tested with a local dataset folder,
which `datasets` loads through the same code path as a Hub id (no network)."""

from __future__ import annotations

import datasets
import pytest

from tests.helpers import make_config, qa_rows, write_jsonl
from tunelab.data.prepare import DataPipeline


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # nothing outside tmp_path


@pytest.fixture
def load_calls(monkeypatch):
    calls = []
    original = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((kwargs.get("streaming", False), type(result).__name__))
        return result

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def dataset_folder(tmp_path, *files):
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    for i, records in enumerate(files):
        write_jsonl(folder / "data" / f"train-{i:05d}-of-{len(files):05d}.jsonl", records)
    return folder


def test_streaming_source_reads_records_as_they_come_and_reports_bad_ones_by_index(
    tmp_path, offline_datasets, load_calls
):
    good = qa_rows(6)
    bad = {"conversations": [{"from": "gpt", "value": "I answer first."}, {"from": "human", "value": "Hm?"}]}
    folder = dataset_folder(tmp_path, good[:3] + [bad] + good[3:])
    pipeline = DataPipeline(make_config(tmp_path, [{"preset": str(folder), "streaming": True}]))
    rows = pipeline.read_all()

    assert load_calls == [(True, "IterableDataset")]
    assert [r.messages[0]["content"] for r in rows] == [g["conversations"][0]["value"] for g in good]
    assert [r.where for r in rows] == [f"{folder}#{i}" for i in (0, 1, 2, 4, 5, 6)]
    assert pipeline.log.dropped.to_json() == {"starts_with_assistant": {"count": 1, "first": [f"{folder}#3"]}}


def test_streaming_and_downloaded_sources_give_the_same_rows(tmp_path, offline_datasets, load_calls):
    folder = dataset_folder(tmp_path, qa_rows(4), qa_rows(3, tag="x"))
    streamed = DataPipeline(make_config(tmp_path, [{"preset": str(folder), "streaming": True}])).read_all()
    loaded = DataPipeline(make_config(tmp_path, [{"preset": str(folder)}])).read_all()
    assert [c[0] for c in load_calls] == [True, False]
    assert [(r.id, r.where) for r in streamed] == [(r.id, r.where) for r in loaded] and len(streamed) == 7


def test_an_error_mid_stream_keeps_the_records_before_it(tmp_path, offline_datasets):
    folder = dataset_folder(tmp_path, qa_rows(4), qa_rows(3, tag="x"))
    (folder / "data" / "train-00001-of-00002.jsonl").write_text('{"conversations": [oops\n', encoding="utf-8")
    pipeline = DataPipeline(make_config(tmp_path, [{"preset": str(folder), "streaming": True}]))
    rows = pipeline.read_all()
    assert len(rows) == 4
    dropped = pipeline.log.dropped.to_json()
    assert list(dropped) == ["stream_error"] and dropped["stream_error"]["first"] == [f"{folder}#4"]
    assert pipeline.counts[str(folder)].records_read == 4
