"""The GPU paths: QLoRA (4-bit NF4 base, bitsandbytes), adamw_8bit, gradient checkpointing, bf16 autocast.

These need CUDA + bitsandbytes and are skipped on CPU-only machines (CI has no GPU); the figures from the
last run on a GPU are in docs/benchmarks.md. The same recipe on a CPU (bitsandbytes' CPU backend) is tested in
tests/train/test_qlora.py, tests/models/test_qlora_run.py and tests/test_cli.py (the shipped QLoRA configs).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import conversations_file, small_llama_folder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("quantized", [True, False], ids=["qlora-4bit-adamw8bit", "lora-bf16"])
def test_cuda_training_learns_and_resumes(tmp_path, quantized):
    from tunelab.config import load_config
    from tunelab.train.recipe import run_training

    model_dir, data = small_llama_folder(tmp_path), conversations_file(tmp_path)
    overrides = [
        f"model.name={model_dir}",
        f"data.sources=[{{path: {data}}}]",
        f"data.output_dir={tmp_path / 'prepared'}",
        "data.dedup.near=false",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=12",
        "train.batch_size=4",
        "train.lr=2e-3",
        "train.save_steps=6",
        "train.eval_steps=6",
        "train.max_seq_len=128",
        f"model.load_in_4bit={str(quantized).lower()}",
        f"train.optimizer={'adamw_8bit' if quantized else 'adamw'}",
        f"train.gradient_checkpointing={str(quantized).lower()}",
        "data.val_fraction=0.1",
    ]
    summary = run_training(load_config(None, overrides), log=lambda *_: None)
    assert summary["precision"] == "bf16"
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if "loss" in r]
    assert train_losses[-1] < train_losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # Extending the run resumes from the step-12 checkpoint.
    more = run_training(load_config(None, [*overrides, "train.max_steps=14"]), extend=True, log=lambda *_: None)
    assert more["resumed_from_step"] == 12 and more["steps"] == 14
