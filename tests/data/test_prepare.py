"""prepare_dataset end to end: folder layout, columns, report, cache reuse; and the embedded data sets."""

from __future__ import annotations

import json
import time

from tests.data.conftest import make_config, qa_rows, write_json
from tunelab.config import config_from_dict
from tunelab.data.masking import IGNORE_INDEX
from tunelab.data.prepare import DataPipeline, load_prepared, output_folder, prepare_dataset
from tunelab.data.readers import FileStats, ReadContext, embedded_files, iter_file
from tunelab.data.problems import ProblemLog

COLUMNS = ["id", "source", "messages", "input_ids", "labels", "num_tokens", "num_label_tokens"]


def test_prepare_writes_the_design_layout(tmp_path):
    path = write_json(tmp_path / "d.json", qa_rows(30) + [{"conversations": [{"from": "gpt", "value": "x"}]}])
    cfg = make_config(tmp_path, [{"path": str(path), "name": "tiny"}], val_fraction=0.2)
    folder = prepare_dataset(cfg)
    assert folder == tmp_path / "prepared"
    assert {p.name for p in folder.iterdir()} == {"train", "val", "report.json", "summary.md", "token_lengths.png"}
    train, val = load_prepared(folder)
    assert train.column_names == COLUMNS and val.column_names == COLUMNS
    row = train[0]
    assert row["source"] == "tiny" and row["num_tokens"] == len(row["input_ids"]) == len(row["labels"])
    assert row["num_label_tokens"] == sum(label != IGNORE_INDEX for label in row["labels"]) > 0
    assert json.loads(row["messages"])[-1]["role"] == "assistant"

    report = json.loads((folder / "report.json").read_text())
    assert report["splits"]["train"] == len(train) and report["splits"]["val"] == len(val) and len(train) + len(val) == 30
    assert report["sources"][0]["records_read"] == 31 and report["sources"][0]["valid"] == 30
    assert report["dropped"]["starts_with_assistant"]["count"] == 1
    assert report["truncation"]["policy"] == "truncate" and report["truncation"]["max_seq_len"] == 256
    assert report["tokens"]["train"]["max"] <= 256
    assert "| tiny | 31 | 30 |" in (folder / "summary.md").read_text()
    assert (folder / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_prepared_folder_is_reused_until_config_or_inputs_change(tmp_path):
    path = write_json(tmp_path / "d.json", qa_rows(10))
    cfg = make_config(tmp_path, [{"path": str(path)}])
    folder = prepare_dataset(cfg)
    stamp = (folder / "report.json").stat().st_mtime_ns
    assert prepare_dataset(cfg) == folder and (folder / "report.json").stat().st_mtime_ns == stamp
    time.sleep(0.01)
    write_json(path, qa_rows(12))  # the data changed: rebuilt
    prepare_dataset(cfg)
    assert json.loads((folder / "report.json").read_text())["records_read"] == 12
    assert prepare_dataset(cfg, force=True) == folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_default_folder_is_keyed_by_data_model_and_max_seq_len(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    base = config_from_dict({})
    folder = output_folder(base)
    assert folder.parent == tmp_path / "data"
    assert output_folder(config_from_dict({"train": {"max_seq_len": 1024}})) != folder
    assert output_folder(config_from_dict({"data": {"val_fraction": 0.1}})) != folder
    assert output_folder(config_from_dict({"model": {"chat_template": "chatml"}})) != folder
    assert output_folder(config_from_dict({"train": {"lr": 1e-3}})) == folder


def test_embedded_sharegpt_recovers_every_complete_record():
    [(path, label)] = embedded_files("embedded:sharegpt")
    log = ProblemLog()
    stats = FileStats(label)
    start = time.perf_counter()
    records = list(iter_file(path, ReadContext(label, "sharegpt", log, 10**9, stats)))
    assert time.perf_counter() - start < 10
    assert len(records) == stats.records == 17_671
    assert stats.unparsed_bytes > 0 and log.dropped.counts == {"unparsed_tail": 1}
    assert all("conversations" in r.value for r in records)


def test_embedded_chatterbot_gives_english_question_answer_pairs(tmp_path, chatml_tokenizer):
    cfg = config_from_dict({"data": {"sources": [{"preset": "embedded:chatterbot"}], "output_dir": str(tmp_path / "o")}})
    pipeline = DataPipeline(cfg, tokenizer=chatml_tokenizer)
    rows = pipeline.read_all()
    assert 1500 < len(rows) < 2500
    assert all(r.messages[0]["role"] == "user" and r.messages[-1]["role"] == "assistant" for r in rows)
    assert any(r.where.startswith("chatterbot/greetings.yml#") for r in rows)


def test_a_failure_while_writing_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    import pytest

    from tunelab.data import prepare

    path = write_json(tmp_path / "d.json", qa_rows(10))
    cfg = make_config(tmp_path, [{"path": str(path)}])
    folder = prepare_dataset(cfg)
    before = json.loads((folder / "report.json").read_text())

    def half_written(out, train, val):
        (out / "train").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "save_splits", half_written)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(cfg, force=True)
    assert json.loads((folder / "report.json").read_text()) == before
    assert len(load_prepared(folder)[0]) + len(load_prepared(folder)[1]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "prepared"]  # no temp folder left
