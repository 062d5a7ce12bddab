"""`tunelab data prepare` with `train.objective: dpo|kto`: preference records -> tokenised rows.

Token ids are checked against an independent reference: the tokenizer's own chat template rendered as whole
texts (prompt with add_generation_prompt; prompt + completion, which must end with the turn-end token).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import write_jsonl
from tunelab.config import config_from_dict
from tunelab.data.prepare import load_prepared, prepare_dataset
from tunelab.data.problems import DataError
from tunelab.serve.feedback_export import dpo_record

IGNORE = -100


def pref_config(tmp_path, path, objective="dpo", **data):
    data = {"sources": [{"path": str(path)}], "output_dir": str(tmp_path / "prepared"), "val_fraction": 0.2, **data}
    return config_from_dict({"data": data, "train": {"objective": objective, "max_seq_len": 128}})


def feedback_row(i: int) -> dict:
    """What the app stores for a thumbs-down answer with a better answer typed by the user."""
    messages = [{"role": "system", "content": "You plan trips."}, {"role": "user", "content": f"A day in city {i}?"}]
    return {
        "rating": -1,
        "better_answer": f"Walk the old town of city {i}, then eat.",
        "response": f"No idea {i}.",
        "messages": messages,
    }


def all_rows(folder):
    train, val = load_prepared(folder)
    return [*train, *val]


def test_feedback_export_dpo_records_are_read_as_is(tmp_path, chatml_tokenizer):
    records = [dpo_record(feedback_row(i)) for i in range(12)]
    folder = prepare_dataset(pref_config(tmp_path, write_jsonl(tmp_path / "dpo.jsonl", records)))
    rows = all_rows(folder)
    assert len(rows) == 12
    report = json.loads((folder / "report.json").read_text())
    assert (
        report["objective"] == "dpo"
        and report["dropped"] == {}
        and report["splits"]["val"] == len(load_prepared(folder)[1])
    )

    tok = chatml_tokenizer
    by_prompt = {json.dumps(r["prompt"]): r for r in records}
    for row in rows:
        record = by_prompt[json.dumps(json.loads(row["prompt"]))]
        prompt_text = tok.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        assert row["prompt_len"] == len(prompt_ids)
        for name in ("chosen", "rejected"):
            whole = tok.apply_chat_template(record["prompt"] + record[name], tokenize=False).rstrip()
            assert whole.endswith("<|im_end|>")
            ids, labels = row[f"{name}_input_ids"], row[f"{name}_labels"]
            assert ids == tok(whole, add_special_tokens=False)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids
            assert labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
            assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
            assert tok.decode(labels[len(prompt_ids) :]) == record[name][0]["content"] + "<|im_end|>"
        assert row["num_label_tokens"] == sum(x != IGNORE for x in row["chosen_labels"] + row["rejected_labels"])


def test_prompt_and_completion_forms_give_the_same_tokens(tmp_path):
    """prompt string == one user message; completion string == assistant message == [assistant message]."""
    plain = [{"prompt": f"Best month for Oslo {i}?", "chosen": f"June {i}.", "rejected": "Never."} for i in range(8)]
    structured = [
        {
            "messages": [{"role": "user", "content": r["prompt"]}],
            "chosen": {"role": "assistant", "content": r["chosen"]},
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in plain
    ]
    first = all_rows(prepare_dataset(pref_config(tmp_path / "a", write_jsonl(tmp_path / "a.jsonl", plain))))
    second = all_rows(prepare_dataset(pref_config(tmp_path / "b", write_jsonl(tmp_path / "b.jsonl", structured))))
    assert len(first) == 8
    assert [(r["id"], r["chosen_input_ids"], r["rejected_labels"]) for r in first] == [
        (r["id"], r["chosen_input_ids"], r["rejected_labels"]) for r in second
    ]


def test_multi_turn_prompt_labels_only_the_completion(tmp_path, chatml_tokenizer):
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Rome?"},
    ]
    records = [{"prompt": prompt, "chosen": f"Go {i}.", "rejected": "No."} for i in range(6)]
    for row in all_rows(prepare_dataset(pref_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", records)))):
        labelled = [x for x in row["chosen_labels"] if x != IGNORE]
        assert chatml_tokenizer.decode(labelled) in {f"Go {i}.<|im_end|>" for i in range(6)}


def test_kto_records_keep_their_label(tmp_path, chatml_tokenizer):
    records = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(10)]
    folder = prepare_dataset(pref_config(tmp_path, write_jsonl(tmp_path / "kto.jsonl", records), objective="kto"))
    rows = all_rows(folder)
    assert {r["prompt"]: r["label"] for r in rows} == {
        json.dumps([{"role": "user", "content": f"Question {i}?"}]): i % 2 == 0 for i in range(10)
    }
    for row in rows:
        assert chatml_tokenizer.decode([x for x in row["labels"] if x != IGNORE]).endswith(".<|im_end|>")
    labels = json.loads((folder / "report.json").read_text())["labels"]
    assert labels["train"]["desirable"] + labels["val"]["desirable"] == 5


def test_bad_records_are_counted_with_their_location(tmp_path):
    good = [{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(6)]
    bad = [
        {"prompt": "Q?", "chosen": "Yes."},  # line 7: no rejected
        {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},  # line 8
        {
            "prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
            "chosen": "x",
            "rejected": "y",
        },  # 9
        {"prompt": 3, "chosen": "x", "rejected": "y"},  # line 10
        {"prompt": "Q?", "chosen": {"role": "user", "content": "x"}, "rejected": "y"},  # line 11
        {"prompt": "Q?", "chosen": "long " * 200, "rejected": "y"},  # line 12: over max_seq_len 128
    ]
    path = write_jsonl(tmp_path / "d.jsonl", good + bad)
    folder = prepare_dataset(pref_config(tmp_path, path))
    dropped = json.loads((folder / "report.json").read_text())["dropped"]
    where = lambda line: f"{path}:{line}"  # noqa: E731
    assert dropped["missing_field"]["first"] == [where(7)]
    assert dropped["identical_pair"]["first"] == [where(8)]
    assert dropped["prompt_not_user"]["first"] == [where(9)]
    assert dropped["wrong_type"]["first"] == [where(10), where(11)]
    assert dropped["over_max_seq_len"]["first"] == [where(12)]
    assert len(all_rows(folder)) == 6

    with pytest.raises(DataError, match=rf"^{path}:7: missing `rejected` \[missing_field\]"):
        prepare_dataset(pref_config(tmp_path / "fail", path, on_error="fail"))


def test_kto_label_must_be_a_bool_and_both_kinds_present(tmp_path):
    path = write_jsonl(
        tmp_path / "k.jsonl",
        [{"prompt": "Q?", "completion": "A.", "label": "yes"}]
        + [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": True} for i in range(8)],
    )
    with pytest.raises(DataError, match=r"KTO needs both desirable"):
        prepare_dataset(pref_config(tmp_path, path, objective="kto"))
    with pytest.raises(DataError, match=rf"^{path}:1: `label` must be true or false, got str \[wrong_type\]"):
        prepare_dataset(pref_config(tmp_path, path, objective="kto", on_error="fail"))


def test_sft_data_given_to_dpo_is_a_one_line_error(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}] * 3,
    )
    with pytest.raises(
        DataError,
        match=r"sft.jsonl: not dpo preference data "
        r"\(expected prompt/messages \+ chosen \+ rejected; first record has: messages\)",
    ):
        prepare_dataset(pref_config(tmp_path, path))


def test_objective_is_part_of_the_prepared_data_key(tmp_path):
    from tunelab.data.prepare import config_key

    sft = config_from_dict({})
    assert config_key(config_from_dict({"train": {"objective": "dpo"}})) != config_key(sft)
    assert config_key(config_from_dict({"train": {"beta": 0.5}})) == config_key(sft)
