"""`tunelab bench train`: both workers run on a tiny model, write the same JSON shape, train on the same tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import build_tiny_llama
from tunelab.data.masking import IGNORE_INDEX

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(ModelConfig())
    build_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ANSWER_TOKENS = list(range(100, 108))  # every answer cycles through these: a pattern a few steps can learn


def synthetic_rows(n, vocab, seed):
    """Random prompts, answers that follow one pattern (so training measurably lowers the held-out loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(0, vocab, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
        start = int(torch.randint(0, len(ANSWER_TOKENS), (1,), generator=g))
        answer = [ANSWER_TOKENS[(start + i) % len(ANSWER_TOKENS)] for i in range(int(torch.randint(4, 20, (1,), generator=g)))]
        rows.append([prompt + answer, [IGNORE_INDEX] * len(prompt) + answer])
    return rows


def base_val_loss(model_dir, val_rows) -> float:
    from transformers import AutoModelForCausalLM

    from tunelab.train.heldout import heldout_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return heldout_loss(model, [tuple(r) for r in val_rows], batch_size=8, pad_id=0)


def test_both_sides_train_the_same_tokens_and_report_the_same_shape(tiny_model_dir, tmp_path):
    from tunelab.bench import train_worker
    from tunelab.bench.train import summarise

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    data = tmp_path / "data.json"
    val_rows = synthetic_rows(4, vocab, 1)
    data.write_text(json.dumps({"train": synthetic_rows(12, vocab, 0), "val": val_rows}))
    spec = {
        "model_path": str(tiny_model_dir), "data_file": str(data), "steps": 4, "batch_size": 4, "lr": 5e-2,
        "warmup_steps": 1, "weight_decay": 0.01, "max_grad_norm": 1.0, "max_seq_len": 512, "seed": 42, "threads": 1,
        "precision": "fp32", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    results = {}
    for side in ("tunelab", "trl"):
        out = tmp_path / f"{side}.json"
        train_worker.main(["--side", side, "--spec", str(spec_file), "--out", str(out)])
        results[side] = json.loads(out.read_text())

    data_rows = json.loads(data.read_text())["train"]
    expected = sum(len(ids) for ids, _ in train_worker.ordered_rows(data_rows, 4, 4, 42))
    for side, r in results.items():
        assert r["tokens"] == expected, side  # same conversations, no padding counted
        assert len(r["step_seconds"]) == 4
        for key in ("tok_per_s", "s_per_step", "peak_rss_mib", "val_loss", "tok_per_cpu_s"):
            assert isinstance(r[key], float) and r[key] > 0, (side, key)

    doc = summarise({k: [v] for k, v in results.items()}, {"gflops": 100.0, "shapes": {}}, 4 * 1e6)
    assert set(doc["ratio"]) >= {"tok_per_s", "peak_rss_mib"}
    for side in ("tunelab", "trl"):
        assert set(doc[side]) >= {"tok_per_s", "peak_rss_mib", "val_loss", "s_per_step"}
    from tunelab.bench.train import markdown_table

    doc.update(precisions=["fp32"], precision="fp32", command="c", machine="m", date="d", steps=4, conversations_per_step=4, repeats=1)
    assert "tunelab/TRL" in markdown_table(doc)
    # Same data, same maths: both adapters moved the held-out loss well away from the base model's, and
    # they land close together compared with how far they moved.
    base = base_val_loss(tiny_model_dir, val_rows)
    tunelab, trl = doc["tunelab"]["val_loss"], doc["trl"]["val_loss"]
    assert base - tunelab > 0.2 and base - trl > 0.2, (base, tunelab, trl)
    assert abs(tunelab - trl) < 0.01 * (base - tunelab), (base, tunelab, trl)


def test_trl_settings_are_the_shared_job_as_trl_reads_them(tmp_path):
    """The settings dict goes through TRL's own SFTConfig: what the trainer will run is tunelab's job."""
    from trl import SFTConfig

    from tunelab.bench.train_worker import trl_settings

    spec = {"steps": 5, "batch_size": 3, "lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.02, "max_grad_norm": 0.5,
            "max_seq_len": 256, "seed": 7, "precision": "fp32"}
    args = SFTConfig(**trl_settings(spec, str(tmp_path)))
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (5, 3, 1)
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.max_grad_norm) == (3e-4, 2, 0.02, 0.5)
    assert (args.seed, args.max_length, args.lr_scheduler_type.value) == (7, 256, "linear")
    assert args.bf16 is False and args.packing is False and args.use_cpu is True
    assert SFTConfig(**trl_settings({**spec, "precision": "bf16"}, str(tmp_path))).bf16 is True
