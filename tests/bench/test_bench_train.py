"""`tunelab bench train`: both workers run on a tiny model, write the same JSON shape, train on the same tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import build_tiny_llama
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


def synthetic_rows(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(8, 40, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = length // 2
        rows.append([ids, [IGNORE_INDEX] * prompt + ids[prompt:]])
    return rows


def test_both_sides_train_the_same_tokens_and_report_the_same_shape(tiny_model_dir, tmp_path):
    from tunelab.bench import train_worker as bench_worker
    from tunelab.bench.train import summarise

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"train": synthetic_rows(12, vocab, 0), "val": synthetic_rows(4, vocab, 1)}))
    spec = {
        "model_path": str(tiny_model_dir), "data_file": str(data), "steps": 2, "batch_size": 4, "lr": 2e-4,
        "warmup_steps": 1, "weight_decay": 0.01, "max_grad_norm": 1.0, "max_seq_len": 512, "seed": 42, "threads": 1,
        "precision": "fp32", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    results = {}
    for side in ("tunelab", "trl"):
        out = tmp_path / f"{side}.json"
        bench_worker.main(["--side", side, "--spec", str(spec_file), "--out", str(out)])
        results[side] = json.loads(out.read_text())

    data_rows = json.loads(data.read_text())["train"]
    expected = sum(len(ids) for ids, _ in bench_worker.ordered_rows(data_rows, 2, 4, 42))
    for side, r in results.items():
        assert r["tokens"] == expected, side  # same conversations, no padding counted
        assert len(r["step_seconds"]) == 2
        for key in ("tok_per_s", "s_per_step", "peak_rss_mib", "val_loss", "tok_per_cpu_s"):
            assert isinstance(r[key], float) and r[key] > 0, (side, key)

    doc = summarise({k: [v] for k, v in results.items()}, {"gflops": 100.0, "shapes": {}}, 4 * 1e6)
    assert set(doc["ratio"]) >= {"tok_per_s", "peak_rss_mib"}
    for side in ("tunelab", "trl"):
        assert set(doc[side]) >= {"tok_per_s", "peak_rss_mib", "val_loss", "s_per_step"}
    # Same data, same maths: the two adapters land close together on the held-out rows.
    from tunelab.bench.train import markdown_table

    doc.update(precisions=["fp32"], precision="fp32", command="c", machine="m", date="d", steps=2, conversations_per_step=4, repeats=1)
    assert "tunelab/TRL" in markdown_table(doc)
    assert abs(doc["tunelab"]["val_loss"] - doc["trl"]["val_loss"]) < 0.05


def test_trl_settings_match_the_shared_job():
    from tunelab.bench.train_worker import trl_settings

    spec = {"steps": 5, "batch_size": 4, "lr": 2e-4, "warmup_steps": 1, "weight_decay": 0.01, "max_grad_norm": 1.0,
            "max_seq_len": 512, "seed": 1, "precision": "fp32"}
    fp32 = trl_settings(spec, "out")
    assert fp32["bf16"] is False and fp32["packing"] is False and fp32["train_sampling_strategy"] == "sequential"
    assert trl_settings({**spec, "precision": "bf16"}, "out")["bf16"] is True
