"""Exact and near dedup, deterministic mixing, and a split that adding data never changes."""

from __future__ import annotations

from tests.helpers import make_config, qa_rows, sharegpt, write_json
from tunelab.data.dedup import near_duplicates
from tunelab.data.prepare import DataPipeline, load_prepared, prepare_dataset
from tunelab.data.split import copies_for_weight, is_validation

STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk to light the great lamp, "
    "and from the top he watched the fishing boats return across the grey water while gulls circled the harbour "
    "and the wind carried the smell of salt and tar over the sleeping village below the cliffs."
)


def test_exact_duplicates_after_normalization(tmp_path):
    rows = [sharegpt("Hello there", "Hi!"), sharegpt("  Hello there \n", "Hi!"), sharegpt("Hello there", "Hi! ")]
    path = write_json(tmp_path / "d.json", rows + qa_rows(2))
    pipeline = DataPipeline(make_config(tmp_path, [{"path": str(path)}]))
    kept = list(pipeline.unique_rows(pipeline.read_all()))
    assert len(kept) == 3
    assert pipeline.duplicates["exact"].count == 2
    record_lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == " {"]
    assert pipeline.duplicates["exact"].first == [f"{path}:{record_lines[1]}", f"{path}:{record_lines[2]}"]


def test_near_duplicates_removed_distinct_texts_kept():
    texts = [
        STORY,
        STORY.replace("grey", "gray"),
        "A completely different text about cooking pasta with garlic and oil.",
        STORY[:60],
    ]
    assert near_duplicates(texts, threshold=0.7, num_perm=128, shingle_words=3) == {1: 0}


def test_near_dedup_in_the_pipeline(tmp_path):
    rows = [
        sharegpt("Tell me a story", STORY),
        sharegpt("Tell me a story", STORY.replace("evening", "night")),
        *qa_rows(3),
    ]
    path = write_json(tmp_path / "n.json", rows)
    pipeline = DataPipeline(make_config(tmp_path, [{"path": str(path)}], dedup={"near": True, "threshold": 0.7}))
    kept = list(pipeline.unique_rows(pipeline.read_all()))
    assert len(kept) == 4 and pipeline.duplicates["near"].count == 1
    assert kept[0].messages[1]["content"] == STORY  # the first occurrence wins


def test_split_is_stable_when_data_is_added(tmp_path, monkeypatch):
    first = write_json(tmp_path / "a.json", qa_rows(60, "a"))
    cfg = make_config(tmp_path, [{"path": str(first)}], val_fraction=0.3, output_dir=str(tmp_path / "one"))
    train1, val1 = load_prepared(prepare_dataset(cfg))
    assert len(val1) > 0 and len(train1) > 0
    more = write_json(tmp_path / "b.json", qa_rows(60, "b"))
    cfg2 = make_config(
        tmp_path, [{"path": str(first)}, {"path": str(more)}], val_fraction=0.3, output_dir=str(tmp_path / "two")
    )
    train2, val2 = load_prepared(prepare_dataset(cfg2))
    assert set(val1["id"]) <= set(val2["id"]) and set(train1["id"]) <= set(train2["id"])
    assert len(val2) > len(val1)
    assert all(is_validation(i, 0.3) for i in val2["id"]) and not any(is_validation(i, 0.3) for i in train2["id"])


def test_mixing_weights_are_deterministic():
    ids = [f"{i:016x}" for i in range(4000)]
    assert [copies_for_weight(i, 0.25) for i in ids] == [copies_for_weight(i, 0.25) for i in ids]
    assert 900 < sum(copies_for_weight(i, 0.25) for i in ids) < 1100
    assert {copies_for_weight(i, 2.5) for i in ids} == {2, 3}
    assert 9500 < sum(copies_for_weight(i, 2.5) for i in ids) < 10500
    assert all(copies_for_weight(i, 1.0) == 1 for i in ids)


def test_weight_repeats_train_rows_only(tmp_path):
    path = write_json(tmp_path / "w.json", qa_rows(40))
    cfg = make_config(tmp_path, [{"path": str(path), "weight": 3}], val_fraction=0.2)
    train, val = load_prepared(prepare_dataset(cfg))
    assert len(train) == 3 * len(set(train["id"]))
    assert len(val) == len(set(val["id"])) and len(set(train["id"])) + len(val) == 40
