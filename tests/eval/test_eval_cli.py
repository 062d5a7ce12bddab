"""`tunelab eval RUN` through the command line on a small run: the held-out losses are plain transformers/PEFT
losses with the adapter off and on, the samples are plain greedy answers; every bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import assert_one_clear_error, conversations_file, fresh_cache, run_tunelab, small_lora_run
from tunelab.data.masking import IGNORE_INDEX


@pytest.fixture
def run(tmp_path, monkeypatch):
    """small_lora_run (a non-zero adapter on a small Llama) whose config trains on a small local sums file."""
    from tunelab.config import load_config

    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))
    run_dir, base_dir = small_lora_run(tmp_path)
    cfg = load_config(run_dir / "config.yaml", [
        f"data.sources=[{{path: {conversations_file(tmp_path, n=24)}}}]", "data.val_fraction=0.25",
        "data.dedup.near=false", "train.max_seq_len=64", "train.threads=1", "train.precision=fp32",
    ])  # fmt: skip
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir, base_dir


def per_token_loss(model, rows) -> float:
    """Plain transformers: model(input_ids, labels).loss per row, weighted by its assistant tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            n = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
            total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * n
            count += n
    return total / count


def plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_eval_reports_plain_peft_losses_and_greedy_samples(run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.prepare import load_prepared, prepare_dataset
    from tunelab.models.runs import run_config
    from tunelab.train.recipe import rows_of

    run_dir, base_dir = run
    done = run_tunelab(capsys, "eval", str(run_dir), "--set", "eval.max_val_rows=4", "--set",
                       "eval.prompts=['What is 3 plus 3?']", "--set", "eval.max_new_tokens=6")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out loss (4 conversations" in done.stdout
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["val_rows"] == 4 and (run_dir / "eval" / "samples.md").is_file()

    rows = list(rows_of(load_prepared(prepare_dataset(run_config(run_dir)))[1])[:4])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run_dir / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert report["tuned"]["val_loss"] == pytest.approx(per_token_loss(tuned, rows), abs=1e-4)
    assert report["base"]["val_loss"] == pytest.approx(per_token_loss(base, rows), abs=1e-4)
    assert report["base"]["val_loss"] != pytest.approx(report["tuned"]["val_loss"], abs=1e-3)
    [sample] = report["samples"]
    assert sample["tuned"] == plain_greedy(tuned, tokenizer, "What is 3 plus 3?", 6)
    assert sample["base"] == plain_greedy(base, tokenizer, "What is 3 plus 3?", 6)


def test_eval_errors_are_one_line_exit_2(run, tmp_path, capsys):
    run_dir, _ = run
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Plan a day in Lima."}\n{"prompt": \n')
    (tmp_path / "no-days.jsonl").write_text('{"prompt": "Plan Lima.", "days": 0}\n')
    cases = [
        (["eval", str(tmp_path / "nothing")], "not a finished tunelab run"),
        (["eval", str(tmp_path / "nothing"), "--prompts", "travel"], "not a finished tunelab run"),
        (["eval", str(tmp_path / "nothing"), "--lm-eval", "arc_easy"], "not a finished tunelab run"),
        (["eval", str(run_dir), "--set", "eval.nope=1"], "nope"),
        (["eval", str(run_dir), "--prompts", str(tmp_path / "missing.jsonl")], "file not found"),
        (["eval", str(run_dir), "--prompts", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
        (["eval", str(run_dir), "--prompts", str(tmp_path / "no-days.jsonl")], "`days` must be a positive integer"),
        (["eval", str(run_dir), "--prompts", "travel", "--quant", "q3_x"], "--quant: unknown type"),
        (["eval", str(run_dir), "--prompts", "travel", "--no-adapter"], "nothing to compare"),
    ]
    for args, needle in cases:
        assert_one_clear_error(run_tunelab(capsys, *args), needle)
    assert not (run_dir / "eval").exists()
