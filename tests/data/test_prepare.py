"""prepare_dataset end to end: folder layout, columns, report, cache reuse; and the embedded data sets."""

from __future__ import annotations

import json

from tests.helpers import make_config, qa_rows, write_json
from tunelab.config import config_from_dict
from tunelab.data.masking import IGNORE_INDEX
from tunelab.data.prepare import DataPipeline, load_prepared, output_folder, prepare_dataset
from tunelab.data.problems import ProblemLog
from tunelab.data.readers import FileStats, ReadContext, embedded_files, iter_file

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
    assert (
        report["splits"]["train"] == len(train) and report["splits"]["val"] == len(val) and len(train) + len(val) == 30
    )
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
    cfg = config_from_dict(
        {"data": {"sources": [{"preset": "embedded:chatterbot"}], "output_dir": str(tmp_path / "o")}}
    )
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

    from tunelab.data.readers import TRAVEL_PLANS

    records = [json.loads(line) for line in TRAVEL_PLANS.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 40  # the plans that stay in their city (tunelab data travel --recheck)
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
    for record in records:
        [user, assistant] = record["messages"]
        days, city = record["days"], record["city"]
        # The request states its length ("a 3-day trip", "3 days", "Three days"); the plan has exactly those days.
        assert re.search(rf"\b(?:{days}|{words[days]})[- ]days?\b", user["content"], re.I), user["content"]
        assert re.findall(r"^Day (\d+):", assistant["content"], re.M) == [str(d) for d in range(1, days + 1)], user
        assert city in user["content"] and city in assistant["content"]
    cfg = config_from_dict(
        {"data": {"sources": [{"preset": "embedded:travel-plans"}], "output_dir": str(tmp_path / "o")}}
    )
    rows = DataPipeline(cfg, tokenizer=chatml_tokenizer).read_all()
    assert len(rows) == len(records)  # the preset reads every plan; normalisation keeps the day structure
    assert sorted(len(re.findall(r"^Day \d+:", r.messages[1]["content"], re.M)) for r in rows) == sorted(
        r["days"] for r in records
    )


def test_data_prepare_command_writes_the_config_folder_with_its_overrides(tmp_path, chatml_tokenizer):
    """`tunelab data prepare CONFIG --set ...`: the folder the config names, split, and tokenised as plain
    transformers renders the conversations with the tokenizer's chat template, under the overridden max_seq_len."""
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    path = write_json(tmp_path / "d.json", qa_rows(10))
    data = {"sources": [{"path": str(path)}], "output_dir": str(tmp_path / "prepared"), "val_fraction": 0.2,
            "dedup": {"near": False}}  # fmt: skip
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"data": data, "train": {"max_seq_len": 256}}), encoding="utf-8")

    result = CliRunner().invoke(app, ["data", "prepare", str(config), "--set", "train.max_seq_len=200"])
    assert result.exit_code == 0, result.output
    assert f"prepared dataset: {tmp_path / 'prepared'}" in result.output
    train, val = load_prepared(tmp_path / "prepared")
    assert len(train) + len(val) == 10 and len(val) > 0
    assert json.loads((tmp_path / "prepared" / "report.json").read_text())["truncation"]["max_seq_len"] == 200
    for row in [*train, *val]:
        # the template's text through the last reply; the whitespace after the turn end is not trained on
        rendered = chatml_tokenizer.apply_chat_template(json.loads(row["messages"]), tokenize=False).rstrip()
        assert row["input_ids"] == chatml_tokenizer(rendered, add_special_tokens=False)["input_ids"]
