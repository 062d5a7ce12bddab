"""`tunelab eval RUN --lm-eval TASKS` (tunelab.eval.harness), offline: a local multiple-choice task written here,
scored by lm-eval on a small run's base and tuned model, against plain transformers/PEFT log-probs computed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import assert_one_clear_error, small_lora_run

ROWS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Oslo"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "loud"], "answer": 1},
    {"question": "A cat says", "choices": ["woof", "meow"], "answer": 1},
    {"question": "Ice is frozen", "choices": ["water", "sand", "light", "wood"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["west", "east"], "answer": 1},
    {"question": "A week has seven", "choices": ["days", "hours", "years"], "answer": 0},
    {"question": "Fish live in", "choices": ["trees", "water"], "answer": 1},
    {"question": "Snow is", "choices": ["black", "white", "red"], "answer": 1},
    {"question": "Bread is made from", "choices": ["flour", "stone"], "answer": 0},
    {"question": "Lisbon is in", "choices": ["Portugal", "Peru", "Poland"], "answer": 0},
    {"question": "A train runs on", "choices": ["rails", "clouds"], "answer": 0},
]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(folder, name="tunelab_tiny_mc", rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_file = folder / f"{name}.yaml"
    yaml_file.write_text(TASK_YAML.format(name=name, rows=data))
    return yaml_file


def hand_accuracy(model, tokenizer, rows) -> tuple[float, float]:
    """acc and acc_norm by hand: sum of the log-probs of " choice" after the question;
    argmax (acc_norm: per character)."""
    acc = acc_norm = 0
    with torch.no_grad():
        for row in rows:
            context = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in row["choices"]:
                continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + continuation])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                positions = range(len(context) - 1, len(context) + len(continuation) - 1)
                scores.append(sum(logprobs[p, t].item() for p, t in zip(positions, continuation)))
            acc += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
            normed = [s / len(" " + c) for s, c in zip(scores, row["choices"])]
            acc_norm += max(range(len(normed)), key=normed.__getitem__) == row["answer"]
    return acc / len(rows), acc_norm / len(rows)


@pytest.mark.timeout(600)
def test_lm_eval_accuracy_of_base_and_tuned_matches_hand_computation(tmp_path):
    pytest.importorskip("lm_eval")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.eval.harness import load_tasks, run_lm_eval

    run_dir, base_dir = small_lora_run(tmp_path)
    task = write_task(tmp_path / "tasks")
    limit = 10
    lines = []
    tasks = load_tasks(str(task), log=lines.append)
    report = run_lm_eval(run_dir, tasks, limit=limit, threads=1, log=lines.append)

    saved = json.loads((run_dir / "eval" / "lm-eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    row = saved["results"]["tunelab_tiny_mc"]
    assert row["samples"] == limit and saved["limit"] == limit and saved["skipped"] == {}

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_acc, base_norm = hand_accuracy(base, tokenizer, ROWS[:limit])
    tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tuned_acc, tuned_norm = hand_accuracy(tuned, tokenizer, ROWS[:limit])
    assert row["metrics"]["acc,none"]["base"] == pytest.approx(base_acc)
    assert row["metrics"]["acc,none"]["tuned"] == pytest.approx(tuned_acc)
    assert row["metrics"]["acc_norm,none"]["base"] == pytest.approx(base_norm)
    assert row["metrics"]["acc_norm,none"]["tuned"] == pytest.approx(tuned_norm)
    assert (base_acc, base_norm) != (tuned_acc, tuned_norm), (
        "the adapter should change some answers, or the test proves little"
    )
    table = next(line for line in lines if line.startswith("task"))
    assert "acc_norm" in table and f"{base_acc:.4f}" in table and f"{tuned_acc:.4f}" in table


def test_without_lm_eval_one_line_and_the_pip_command(monkeypatch):
    from tunelab.eval.harness import load_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    lines = []
    assert load_tasks("hellaswag", log=lines.append) is None
    assert len(lines) == 1 and "lm-eval is not installed" in lines[0] and "pip install" in lines[0]


def test_cli_without_lm_eval_goes_on_with_the_rest_of_eval(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import tunelab.eval.evaluate
    from tunelab.cli import app
    from tunelab.config import Config

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "config.yaml").write_text(Config().to_yaml())
    calls = []
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr(tunelab.eval.evaluate, "evaluate_run", lambda run_dir, **kw: calls.append(run_dir))
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--lm-eval", "hellaswag"])
    assert result.exit_code == 0, result.output
    assert calls == [tmp_path]  # the held-out eval still ran
    assert (
        [line for line in result.output.splitlines() if "lm-eval" in line]
        == [
            line
            for line in result.output.splitlines()
            if line.startswith("lm-eval harness tasks skipped: lm-eval is not installed")
        ]
        != []
    )


def test_task_whose_data_cannot_be_fetched_is_one_line_exit_2(tmp_path):
    pytest.importorskip("lm_eval")
    run_dir, _ = small_lora_run(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # arc_easy is one of lm-eval's built-in tasks; its data is on the Hub, which this run may not reach.
    done = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "eval", str(run_dir), "--lm-eval", "arc_easy"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert_one_clear_error(done, "arc_easy", "could not be fetched")
    assert not (run_dir / "eval").exists()
