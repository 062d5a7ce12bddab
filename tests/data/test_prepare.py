"""prepare_dataset end to end: folder layout, columns, report, cache reuse; and the embedded data sets."""

from __future__ import annotations

import json

from tests.helpers import make_config, qa_rows, write_json
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


def complete_top_level_records(path) -> int:
    """An independent count: the file is `json.dump(..., indent=2)` output, so each complete top-level record
    ends with a line `  }` or `  },` (a newline inside a string is always escaped)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.rstrip(b"\r\n") in (b"  }", b"  },"))


def test_embedded_sharegpt_recovers_every_complete_record():
    [(path, label)] = embedded_files("embedded:sharegpt")
    log = ProblemLog()
    stats = FileStats(label)
    count, first_id = 0, None
    for record in iter_file(path, ReadContext(label, "sharegpt", log, 10**9, stats)):  # streamed, nothing kept
        assert "conversations" in record.value
        first_id = first_id or record.value["id"]
        count += 1
    assert count == stats.records == complete_top_level_records(path) > 10_000
    assert first_id == "QWJhYvA_0"
    assert stats.unparsed_bytes > 0 and log.dropped.counts == {"unparsed_tail": 1}  # the cut-off last record


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

    def half_written(writer, split, row):
        (writer.folder / "train").mkdir(exist_ok=True)
        raise OSError("disk full")

    monkeypatch.setattr(prepare.SplitWriter, "add", half_written)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(cfg, force=True)
    assert json.loads((folder / "report.json").read_text()) == before
    assert len(load_prepared(folder)[0]) + len(load_prepared(folder)[1]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "prepared"]  # no temp folder left


def test_embedded_travel_plans_are_day_by_day_plans_of_the_requested_length(tmp_path, chatml_tokenizer):
    import re

    cfg = config_from_dict({"data": {"sources": [{"preset": "embedded:travel-plans"}], "output_dir": str(tmp_path / "o")}})
    rows = DataPipeline(cfg, tokenizer=chatml_tokenizer).read_all()
    assert len(rows) >= 30
    for row in rows:
        [user, assistant] = row.messages
        # Counted by hand from the request's own words ("a 3-day trip", "I have 2 days"), not by the rubric.
        days = int(re.search(r"(\d+)[- ]days?\b", user["content"]).group(1))
        assert re.findall(r"^Day (\d+):", assistant["content"], re.M) == [str(d) for d in range(1, days + 1)], row.where
        city = re.search(r"(?:trip to|days in|itinerary for) ([A-Z][\w ]+?)(?: with| on| for| in| without|[,.])", user["content"])
        assert city and city.group(1) in assistant["content"], row.where
