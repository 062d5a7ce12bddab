"""End to end on the embedded model: train a few steps, evaluate, and reload the adapter with plain PEFT."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

CONFIG = """
data:
  sources:
    - preset: embedded:sharegpt
      max_records: 400
  val_fraction: 0.1
train:
  max_steps: 4
  batch_size: 2
  lr: 1.0e-3
  max_seq_len: 256
  save_steps: 2
  eval_steps: 4
  precision: fp32
eval:
  max_val_rows: 8
  prompts: ["Name a city in France."]
  max_new_tokens: 8
"""


def test_train_eval_and_plain_peft_reload_agree(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "tunelab.cli"]
    train = subprocess.run(
        [*cli, "train", str(config), "--set", f"train.output_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer_config.json",
        "config.yaml",
        "summary.json",
        "metrics.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] > 0 and summary["final_val_loss"] > 0

    evaluation = subprocess.run([*cli, "eval", str(run_dir)], capture_output=True, text=True, timeout=900)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["samples"][0]["tuned"] and (run_dir / "eval" / "samples.md").is_file()

    # Plain transformers + peft, on the same base, reproduce the tuned loss tunelab reported.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.data.prepare import load_prepared
    from tunelab.train.batching import pad

    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    _, val = load_prepared(summary["data_dir"])
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in list(zip(val["input_ids"], val["labels"]))[: report["val_rows"]]:
            batch = pad([(input_ids, labels)], pad_id=0)
            logits = model(input_ids=batch.input_ids).logits[0].float()
            targets = batch.targets[0]
            keep = targets != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert abs(total / count - report["tuned"]["val_loss"]) < 1e-3
