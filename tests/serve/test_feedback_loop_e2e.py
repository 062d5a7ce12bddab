"""The feedback loop end to end, through the real app (`tunelab serve SERVE_DIR` in a subprocess, gradio_client):

chat and planner answers, thumbs, corrections and side-by-side picks -> `tunelab feedback export` (dpo, kto,
evalset) -> `tunelab train` -> `tunelab promote --serve-dir` -> the restarted app serves the promoted model.

`train.objective: dpo` trains on the exported correction pairs and must reach held-out preference accuracy above
chance; the side-by-side picks are checked in the export but left out of that training (they are sampled with
seeds from the server's own randomness, so not reproducible). The promoted candidate is trained by SFT on the
exported corrections.

Chat and planner answers are greedy (temperature 0): the conversations the exports hold, and so the held-out split
the promotion gate scores, are the same on every run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers import serve_process, small_llama_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CITIES = [
    "Lisbon",
    "Porto",
    "Madrid",
    "Seville",
    "Rome",
    "Florence",
    "Vienna",
    "Prague",
    "Krakow",
    "Berlin",
    "Oslo",
    "Dublin",
]


def better_answer(city: str) -> str:
    return f"In {city}, start at the old town, then walk by the river and end at the food market."


def make_current_run(root, base, sft_path):
    """The model served today: the tiny base behind an untrained LoRA (B = 0), as a run folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / "current"
    config = run_config(root, base, sft_path, run)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    return run


def run_config(root, base, sft_path, out_dir) -> dict:
    return {
        "model": {"name": str(base)},
        "data": {"sources": [{"path": str(sft_path)}], "val_fraction": 0.25, "dedup": {"near": False},
                 "output_dir": str(root / "prepared")},
        "lora": {"r": 8, "alpha": 16},
        "train": {"output_dir": str(out_dir), "max_steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0,
                  "max_seq_len": 96, "save_steps": 30, "eval_steps": 30, "precision": "fp32"},
    }  # fmt: skip


def cli(*args, timeout=900):
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_feedback_round_trip_to_a_promoted_model(tmp_path):
    from gradio_client import Client

    from tunelab.serve.feedback_store import FeedbackStore
    from tunelab.serve.pointer import point_to

    base = small_llama_folder(tmp_path)
    sft_path = tmp_path / "feedback.sft.jsonl"
    current = make_current_run(tmp_path, base, sft_path)
    serve_dir, db = tmp_path / "serve", tmp_path / "feedback.db"
    point_to(serve_dir, current, None, None)

    # ---- collect: chat + planner answers, thumbs, corrections, side-by-side picks
    with serve_process(serve_dir, db, extra_args=["--side-by-side"]) as server:
        client = Client(server.url, verbose=False)
        for i, city in enumerate(CITIES):
            _, _, status = client.predict(f"What should I do first in {city}?", "", 0.0, 0.9, 6, api_name="/chat")
            assert status.startswith("Done"), status
            rating = "up" if i % 4 == 3 else "down"  # an up may come with a better answer too (SFT takes it)
            reasons = ["incorrect"] if rating == "down" else []
            saved = client.predict(rating, reasons, "", better_answer(city), "", api_name="/chat_feedback")[0]
            assert saved.startswith("✅"), saved
        for city in CITIES[:3]:
            a, b, status = client.predict(f"Which museum in {city}?", "", 0.9, 0.9, 6, api_name="/chat_compare")
            assert status.startswith("Done") and a and b, status
            assert client.predict("a", ["too short"], "A is fine", "", api_name="/chat_pick")[0].startswith("✅")
        plan, status = client.predict(
            "Porto", 2, "any time", "budget", "relaxed", ["food"], "", 0.0, 16, False, api_name="/plan"
        )
        assert status.startswith("Done") and "Porto" in plan
        assert client.predict("down", [], "", better_answer("Porto"), "", api_name="/planner_feedback")[0].startswith(
            "✅"
        )
        client.predict("Rome", 1, "any time", "budget", "relaxed", [], "", 0.7, 16, False, api_name="/plan_compare")
        assert client.predict("both_bad", ["unhelpful"], "", "", api_name="/planner_pick")[0].startswith("✅")
    store = FeedbackStore(db)
    rows, picks = store.rows(), store.pairwise_rows()
    store.close()
    assert len(rows) == 13 and len(picks) == 4
    assert {r["model_id"] for r in rows} == {"current"} and all(r["model_hash"].startswith("sha256:") for r in rows)

    # ---- export: a frozen regression set first, then training data without its prompts
    cli("feedback", "export", db, "--format", "evalset", "--max-prompts", "3")
    [evalset] = tmp_path.glob("evalset-*.jsonl")
    held_out = [r["prompt"] for r in read_jsonl(evalset)[1:]]
    assert len(held_out) == 3
    dpo_path = tmp_path / "feedback.dpo.jsonl"
    cli("feedback", "export", db, "--format", "dpo", "-o", dpo_path)
    pairs = read_jsonl(dpo_path)
    prompts = [p["prompt"][-1]["content"] for p in pairs]
    assert not set(prompts) & set(held_out)
    corrections = [p for p in pairs if p["chosen"][0]["content"].startswith("In ")]
    assert len(corrections) == 10 - 3 and len(pairs) - len(corrections) == 3  # + the 3 chat picks; both-bad is no pair
    cli("feedback", "export", db, "--format", "kto")
    kto = read_jsonl(tmp_path / "feedback.kto.jsonl")
    assert sorted(r["label"] for r in kto) == [False] * (10 - 3) + [True] * 3
    cli("feedback", "export", db, "--format", "sft", "-o", sft_path)

    # ---- preference training on the exported correction pairs (the sampled picks are left out: not reproducible)
    corrections_path = tmp_path / "corrections.dpo.jsonl"
    corrections_path.write_text("".join(json.dumps(p) + "\n" for p in corrections))
    dpo = run_config(tmp_path, base, corrections_path, tmp_path / "dpo-run")
    dpo["data"].update(output_dir=str(tmp_path / "prepared-dpo"), val_fraction=0.5)
    dpo["train"].update(objective="dpo", max_seq_len=256, lr=5e-4)
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    cli("train", tmp_path / "dpo.yaml")
    dpo_summary = json.loads((tmp_path / "dpo-run" / "summary.json").read_text())
    assert dpo_summary["objective"] == "dpo" and dpo_summary["final_val_metrics"]["val_pref_accuracy"] > 0.5

    # ---- train the candidate (SFT on the corrections; see the module doc for DPO)
    config = tmp_path / "candidate.yaml"
    config.write_text(yaml.safe_dump(run_config(tmp_path, base, sft_path, tmp_path / "candidate")))
    cli("train", config)

    # ---- promote: the gate compares against the served run, then moves the pointer
    out = cli("promote", tmp_path / "candidate", "--over", current, "--serve-dir", serve_dir, "--evalset", evalset)
    assert "PROMOTE" in out and "| val_loss |" in out and "| regression |" in out
    pointer = json.loads((serve_dir / "current.json").read_text())
    assert pointer["model"] == str((tmp_path / "candidate").resolve()) and pointer["history"][0]["model"] == str(
        current.resolve()
    )

    # ---- the restarted app serves the promoted model
    with serve_process(serve_dir, tmp_path / "feedback2.db") as server:
        client = Client(server.url, verbose=False)
        _, _, status = client.predict("What should I do first in Lisbon?", "", 0.0, 0.9, 6, api_name="/chat")
        assert status.startswith("Done")
        client.predict("up", [], "", "", "", api_name="/chat_feedback")
        assert "model: candidate (transformers)" in server.log()
    store = FeedbackStore(tmp_path / "feedback2.db")
    [row] = store.rows()
    store.close()
    assert row["model_id"] == "candidate" and row["model_hash"] == pointer["model_hash"]
