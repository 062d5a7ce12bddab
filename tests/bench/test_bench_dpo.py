"""`tunelab bench train --objective dpo`: both workers train on the same pairs, count the same tokens, and land on
the same held-out DPO figures (same data, same maths: tunelab's DPO vs TRL's DPOTrainer)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import save_tiny_llama_with_embedded_tokenizer
from tunelab.data.masking import IGNORE_INDEX

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama_with_embedded_tokenizer(tmp_path_factory.mktemp("tiny-llama-dpo"))


def synthetic_pairs(n, vocab, seed):
    """[[chosen ids, labels], [rejected ids, labels]] sharing a prompt."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        sides = []
        for _ in range(2):
            completion = torch.randint(0, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
            sides.append([prompt + completion, [IGNORE_INDEX] * len(prompt) + completion])
        pairs.append(sides)
    return pairs


def dpo_job(model_dir, steps=3, per_step=4):
    """The Config the bench hands both workers (tunelab.bench.train.worker_config) for a small DPO job."""
    from tunelab.bench.train import worker_config
    from tunelab.config import Config

    cfg = Config.model_validate(
        {
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"batch_size": per_step, "lr": 5e-2, "warmup_steps": 0, "weight_decay": 0.0, "beta": 1.0,
                      "max_seq_len": 64, "loss_chunk_tokens": 256, "seed": 42},
        }
    )  # fmt: skip
    return worker_config(cfg, str(model_dir), steps, "fp32", 1, objective="dpo", dpo_loss="sigmoid")


def test_dpo_sides_train_the_same_tokens_and_agree_on_heldout_figures(tiny_model_dir, tmp_path):
    from tunelab.bench import worker
    from tunelab.bench.dpo import markdown_table
    from tunelab.bench.train import summarise, write_spec

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"train": synthetic_pairs(12, vocab, 0), "val": synthetic_pairs(6, vocab, 1)}))
    spec_file = write_spec(dpo_job(tiny_model_dir), data, tmp_path)
    results = {}
    for side in ("tunelab", "trl"):
        out = tmp_path / f"{side}.json"
        worker.main(["--side", side, "--spec", str(spec_file), "--out", str(out)])
        results[side] = json.loads(out.read_text())

    pairs = json.loads(data.read_text())["train"]
    expected = sum(len(c[0]) + len(r[0]) for c, r in worker.ordered_rows(pairs, 3, 4, 42))
    for side, r in results.items():
        assert r["tokens"] == expected, side  # chosen + rejected of the same pairs, no padding counted
        assert len(r["step_seconds"]) == 3
    # Before training the policy is the reference: held-out DPO loss log 2, reward margin 0. Both sides must have
    # moved away from there (lr 5e-2, beta 1: ~0.1 and ~0.2), and land together compared with how far they moved
    # (same pairs, order and maths: ~1e-5 of it; a 10 % larger step on one side is ~10 % of it).
    t, trl = results["tunelab"], results["trl"]
    moved_loss, moved_margin = math.log(2) - trl["val_loss"], trl["val_reward_margin"]
    assert moved_loss > 0.05 and moved_margin > 0.1, (moved_loss, moved_margin)
    assert abs(t["val_loss"] - trl["val_loss"]) < 0.01 * moved_loss, (t["val_loss"], trl["val_loss"])
    assert abs(t["val_reward_margin"] - trl["val_reward_margin"]) < 0.01 * moved_margin, (
        t["val_reward_margin"],
        trl["val_reward_margin"],
    )

    doc = summarise({k: [v] for k, v in results.items()}, {"gflops": 100.0, "shapes": {}}, 4 * 1e6)
    for side in ("tunelab", "trl"):
        for key in ("val_pref_accuracy", "val_reward_margin"):
            doc[side][key] = results[side][key]
    doc.update(
        precisions=["fp32"],
        precision="fp32",
        command="c",
        machine="m",
        date="d",
        steps=3,
        pairs_per_step=4,
        repeats=1,
        beta=0.1,
    )
    assert "tunelab/TRL" in markdown_table(doc)
