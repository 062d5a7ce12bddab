"""Every `tunelab bench ...` command as a user runs it (a subprocess of the real CLI) on the tiniest inputs: it exits
0 and writes the JSON it promises, with figures checked against what the inputs imply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import conversations_file, embedded_gguf, fresh_cache, save_tiny_llama_with_embedded_tokenizer
from tunelab.serve.llama_server import llama_server_binary

pytestmark = pytest.mark.slow  # each runs the real CLI on the embedded tokenizer or model: 20-90 s on 2 busy cores
STEPS, PER_STEP, SEED = 2, 2, 42


def tunelab(tmp_path: Path, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNELAB_CACHE": str(fresh_cache(tmp_path / "cache")), "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> Path:
    """A config for a tiny job: a tiny Llama with the embedded tokenizer, 64 short conversations."""
    folder = tmp_path_factory.mktemp("bench-cli")
    model = save_tiny_llama_with_embedded_tokenizer(folder / "model")
    config = {
        "data": {"sources": [{"path": str(conversations_file(folder, n=64))}], "output_dir": str(folder / "prepared")},
        "model": {"name": str(model)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"batch_size": PER_STEP, "max_seq_len": 128, "lr": 1e-2, "warmup_steps": 0, "seed": SEED},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def expected_flops(model_dir: str, sequences: list) -> float:
    """train/flops.py's count of training once on these (ids, labels) sequences, logits on labelled targets."""
    from transformers import AutoConfig

    from tunelab.data.masking import IGNORE_INDEX
    from tunelab.train.flops import model_shape, training_flops

    shape = model_shape(AutoConfig.from_pretrained(model_dir), 4, "all-linear")
    targets = sum(1 for _, labels in sequences for x in labels[1:] if x != IGNORE_INDEX)
    return training_flops(shape, [len(ids) for ids, _ in sequences], targets)


def train_args(config: Path, out: Path, *more: str) -> list[str]:
    return ["bench", "train", "--config", str(config), "--steps", str(STEPS), "--repeats", "1",
            "--precision", "fp32", "--threads", "1", "--max-val-rows", "4", "--json", str(out), *more]  # fmt: skip


def test_bench_train_sft(tiny_job, tmp_path):
    from tunelab.bench.worker import ordered_rows
    from tunelab.config import load_config
    from tunelab.data.prepare import load_prepared
    from tunelab.train.recipe import rows_of

    out = tmp_path / "train.json"
    tunelab(tmp_path, *train_args(tiny_job, out, "--vs", "none"))
    doc = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert (doc["precisions"], doc["steps"], doc["conversations_per_step"]) == (["fp32"], STEPS, PER_STEP)
    cfg = load_config(tiny_job)
    train, _ = load_prepared(cfg.data.output_dir)
    trained = ordered_rows(rows_of(train), STEPS, PER_STEP, SEED)
    assert doc["tunelab"]["tokens"] == sum(len(ids) for ids, _ in trained)  # packed: every real token, no padding
    assert doc["job_flops"] == pytest.approx(expected_flops(cfg.model.name, trained))
    assert "trl" not in doc and doc["tunelab"]["val_loss"] > 0


def test_bench_train_dpo(tiny_job, tmp_path):
    """This command stopped with an ImportError before it had a test."""
    pytest.importorskip("trl")
    out = tmp_path / "dpo.json"
    tunelab(tmp_path, *train_args(tiny_job, out, "--objective", "dpo", "--vs", "trl"))
    from tunelab.bench.dpo import bench_pairs
    from tunelab.bench.worker import ordered_rows
    from tunelab.config import load_config

    doc = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert (doc["objective"], doc["steps"], doc["pairs_per_step"]) == ("dpo", STEPS, PER_STEP)
    # The same pairs as the bench built (the build is deterministic): chosen + rejected of each, on both sides.
    cfg = load_config(tiny_job)
    train, _ = bench_pairs(cfg, tmp_path, int(STEPS * PER_STEP * 1.5) + 2 * 4, 4)
    trained = ordered_rows(train, STEPS, PER_STEP, SEED)
    sequences = [sequence for pair in trained for sequence in pair]
    assert doc["tunelab"]["tokens"] == doc["trl"]["tokens"] == sum(len(ids) for ids, _ in sequences)
    assert doc["job_flops"] == pytest.approx(expected_flops(cfg.model.name, sequences))  # not 4 x parameters
    for side in ("tunelab", "trl"):
        assert 0.0 <= doc[side]["val_pref_accuracy"] <= 1.0 and doc[side]["val_loss"] > 0
    assert doc["ratio"]["tok_per_s"] > 0


def test_bench_data_scales(tmp_path):
    out = tmp_path / "data.json"
    tunelab(tmp_path, "bench", "data", "--scales", "1,2", "--max-records", "200", "--json", str(out))
    doc = json.loads(out.read_text())
    one, two = doc["results"]
    assert (one["scale"], one["records"], two["scale"], two["records"]) == (1, 200, 2, 400)
    for result in (one, two):
        # every valid row is either a duplicate of an earlier one or kept; kept rows are split into train and val
        assert result["valid"] - result["exact_duplicates"] - result["near_duplicates"] == result["after_dedup"]
        assert 0 < result["train"] and result["train"] + result["val"] <= result["after_dedup"]
        assert set(result["seconds"]) == {"recover", "normalize", "dedup_exact", "dedup_near", "encode"}
    # the second copy differs from the first by a short suffix: exact dedup keeps it, near dedup drops it
    assert two["valid"] == 2 * one["valid"] and two["exact_duplicates"] == one["exact_duplicates"] * 2
    assert two["near_duplicates"] > one["near_duplicates"]


def test_bench_data_rows(tmp_path):
    """This command died printing its table (after all the work) and lost every figure before it had a test.
    The plain Hugging Face floor beside prepare must really load, tokenize and save every input row."""
    import datasets
    import pyarrow.parquet as pq

    out = tmp_path / "rows.json"
    tunelab(tmp_path, "bench", "data", "--rows", "100,150", "--out", str(tmp_path / "work"), "--json", str(out))
    doc = json.loads(out.read_text())
    for r in doc["results"]:
        floor = r["hf_floor"]
        assert floor["wall_s"] > 0 and floor["rows_per_s"] > 0 and floor["peak_rss_mib"] > 0
        assert r["prepare_over_floor"] == pytest.approx(r["prepare"]["wall_s"] / floor["wall_s"], abs=0.01)
        inputs = tmp_path / "work" / "inputs" / f"conversations-{r['rows']}"
        input_rows = pq.ParquetFile(f"{inputs}.parquet").metadata.num_rows
        if r["format"] == "jsonl":
            input_rows = sum(1 for line in open(f"{inputs}.jsonl", encoding="utf-8") if line.strip())
        saved = datasets.load_from_disk(floor["saved_to"])
        assert input_rows == len(saved) == r["rows"]
        assert all(0 < len(ids) <= doc["config"]["max_seq_len"] for ids in saved["input_ids"])
    assert [(r["rows"], r["format"]) for r in doc["results"]] == [
        (100, "jsonl"), (100, "parquet"), (150, "jsonl"), (150, "parquet"),
    ]  # fmt: skip
    for jsonl, parquet in zip(doc["results"][::2], doc["results"][1::2]):
        # the same conversations in two formats: the same prepared rows
        assert (jsonl["train_rows"], jsonl["val_rows"]) == (parquet["train_rows"], parquet["val_rows"])
        assert 0 < jsonl["train_rows"] + jsonl["val_rows"] <= jsonl["rows"]
        assert jsonl["prepare"]["peak_rss_mib"] > 0 and jsonl["train_read"]["peak_rss_mib"] > 0
    assert set(doc["flat_rss"]["ratios"]) == {"jsonl prepare", "jsonl train_read", "parquet prepare",
                                              "parquet train_read"}  # fmt: skip


def test_bench_infer(tmp_path):
    from tunelab.config import DEMO_PROMPTS

    gguf, out = embedded_gguf(), tmp_path / "infer.json"
    tunelab(tmp_path, "bench", "infer", str(gguf), "--threads", "1", "--max-new-tokens", "8", "--repeats", "1",
            "--output", str(out))  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["prompts"] == DEMO_PROMPTS and doc["max_new_tokens"] == 8
    (result,) = doc["results"]
    assert "error" not in result, result
    assert result["backend"] == "llama.cpp"
    assert result["size_mib"] == round(gguf.stat().st_size / 2**20, 1)
    assert 0 < result["tokens_per_reply"] <= 8 and result["ttft_s"] > 0


def test_bench_serve(tmp_path):
    out = tmp_path / "serve.json"
    tunelab(tmp_path, "bench", "serve", str(embedded_gguf()), "--users", "2", "--rounds", "1",
            "--max-new-tokens", "16", "--threads", "1", "--engines", "llama-cpp-python,llama-server", "--parallel", "3",
            "--output", str(out), env={"TUNELAB_LLAMA_SERVER": str(llama_server_binary(build=False))})  # fmt: skip
    doc = json.loads(out.read_text())
    # --parallel reaches llama-server (the slots its app logged), is recorded, and means nothing in-process
    assert doc["parallel"] == 3 and all(r["parallel"] == 3 for r in doc["results"])
    assert [r["slots"] for r in doc["results"]] == [None, None, 3, 3]
    crowd = doc["results"][0]  # the first engine with the crowd, then with one user; then the second engine
    assert [(r["engine"], r["users"]) for r in doc["results"]] == [
        ("llama-cpp-python", 2),
        ("llama-cpp-python", 1),
        ("llama-server", 2),
        ("llama-server", 1),
    ]
    assert doc["engines"]["llama-cpp-python"]["crowd"]["answers"] == 4 and crowd["errors"] == []  # 2 x (chat + plan)
    assert all(r["feedback_submitted"] == r["feedback_stored"] == 2 * r["users"] for r in doc["results"])
    assert {a["tab"] for a in crowd["answers"]} == {"chat", "planner"}
    engines = doc["engines"]
    ratio = doc["ratios_vs_first"]["llama-server"]["aggregate_tok_s"]
    by_hand = (
        engines["llama-server"]["crowd"]["aggregate_tok_s"] / engines["llama-cpp-python"]["crowd"]["aggregate_tok_s"]
    )
    assert ratio == pytest.approx(by_hand)
