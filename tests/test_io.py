"""tunelab.io: a reader sees the old file/folder or the new one, and a failed write leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from tunelab.io import atomic_folder, atomic_path, atomic_write, remove_leftovers, write_jsonl


def test_atomic_write_replaces_text_and_bytes(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, "first")
    atomic_write(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("converter died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_atomic_folder_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    folder = tmp_path / "adapter"
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(ValueError), atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("v2-half")
        raise ValueError("disk full")
    assert (folder / "weights").read_text() == "v1"
    with atomic_folder(folder) as tmp:
        (tmp / "other").write_text("v2")
    assert sorted(p.name for p in folder.iterdir()) == ["other"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_remove_leftovers_sweeps_only_temp_names(tmp_path):
    (tmp_path / ".summary.json.tmp-abc").write_text("x")
    (tmp_path / ".adapter.tmp-xyz").mkdir()
    (tmp_path / ".adapter.old-123").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / ".hidden").write_text("keep")
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "summary.json"]


def test_write_jsonl_writes_one_utf8_object_a_line_and_counts_them(tmp_path):
    target = tmp_path / "new" / "folder" / "rows.jsonl"  # parents are made
    records = [{"city": "Köln", "days": 2}, {"text": "naïve — ok"}, []]
    assert write_jsonl(target, (r for r in records)) == 3  # a generator streams in
    assert target.read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    assert "Köln" in target.read_text(encoding="utf-8")  # not \u-escaped
    assert write_jsonl(target, []) == 0 and target.read_text() == ""  # replaced, even by nothing
    assert [p.name for p in target.parent.iterdir()] == ["rows.jsonl"]


def test_write_jsonl_that_fails_midway_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "export.jsonl"
    write_jsonl(target, [{"n": 1}])

    def records():
        yield {"n": 2}
        raise RuntimeError("database went away")

    with pytest.raises(RuntimeError):
        write_jsonl(target, records())
    assert target.read_text() == '{"n": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["export.jsonl"]


def test_jsonl_records_reads_objects_and_names_the_line_of_a_bad_one(tmp_path):
    from tunelab.errors import UserError
    from tunelab.io import jsonl_records

    good = tmp_path / "good.jsonl"
    good.write_bytes(b'\xef\xbb\xbf{"a": 1, "b": "\xc3\xa9"}\n\n  \n{"a": 2}\n')  # a BOM, blank lines, UTF-8
    assert list(jsonl_records(good)) == [(f"{good}:1", {"a": 1, "b": "\u00e9"}), (f"{good}:4", {"a": 2})]
    bad = tmp_path / "bad.jsonl"
    for text, message in [
        ('{"a": 1}\n{"a": 2,}\n', f"{bad}:2: not valid JSON ("),
        ('{"a": 1}\n\n"text"\n', f"{bad}:3: expected a JSON object, got str"),
    ]:
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(UserError) as error:
            list(jsonl_records(bad))
        assert str(error.value).startswith(message)
