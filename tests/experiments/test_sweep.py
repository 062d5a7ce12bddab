"""`tunelab sweep` on a tiny model: one run per grid point, evaluated, ranked by held-out loss."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import build_tiny_llama


@pytest.fixture
def tiny_setup(tmp_path):
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    model_dir = tmp_path / "tiny"
    tokenizer = load_tokenizer(ModelConfig())
    build_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cities = ["Lisbon", "Paris", "Rome", "Oslo", "Cairo", "Lima", "Tokyo", "Quito", "Accra", "Hanoi"]
    with open(tmp_path / "chats.jsonl", "w") as f:
        for i in range(40):
            city = cities[i % len(cities)]
            messages = [
                {"role": "user", "content": f"Question {i}: what should I see in {city} on day {i % 5 + 1}?"},
                {
                    "role": "assistant",
                    "content": f"In {city}, start with the old town, then a museum; day {i % 5 + 1} ends by the river.",
                },
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    config = {
        "data": {
            "sources": [{"path": str(tmp_path / "chats.jsonl")}],
            "val_fraction": 0.25,
            "dedup": {"near": False},
            "output_dir": str(tmp_path / "prepared"),
        },
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "output_dir": str(tmp_path / "runs" / "base"),
            "max_steps": 2,
            "batch_size": 2,
            "warmup_steps": 0,
            "save_steps": 2,
            "eval_steps": 2,
            "precision": "fp32",
            "threads": 1,
        },
        "eval": {"max_val_rows": 4, "batch_size": 4},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path


def test_sweep_runs_each_point_and_ranks_by_held_out_loss(tiny_setup):
    from tunelab.experiments.sweep import run_sweep

    config, tmp_path = tiny_setup
    out = tmp_path / "sweep"
    results = run_sweep(config, ["train.lr=1e-4,5e-3", "lora.r=2"], output=out, log=lambda *_: None)
    assert len(results) == 2
    doc = json.loads((out / "sweep.json").read_text())
    losses = [r["val_loss_tuned"] for r in doc["runs"]]
    assert losses == sorted(losses) and doc["ranked_by"] == "val_loss_tuned"
    for r in doc["runs"]:
        assert (out / r["name"] / "adapter").is_dir() and (out / r["name"] / "eval" / "eval.json").is_file()
        assert r["val_loss_base"] > 0 and r["train_tok_per_s"] > 0 and r["lora.r"] == 2
    assert (out / "sweep.png").stat().st_size > 0
    assert "| rank |" in (out / "sweep.md").read_text()


def test_grid_parsing_rejects_bad_items():
    from tunelab.config import ConfigError
    from tunelab.experiments.sweep import grid_points, parse_grid

    assert grid_points(parse_grid(["train.lr=1e-4,2e-4", "lora.r=8,16"])) == [
        {"train.lr": 1e-4, "lora.r": 8},
        {"train.lr": 1e-4, "lora.r": 16},
        {"train.lr": 2e-4, "lora.r": 8},
        {"train.lr": 2e-4, "lora.r": 16},
    ]
    for bad in (["train.lr"], ["=1,2"], ["lora.r=8", "lora.r=16"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)
