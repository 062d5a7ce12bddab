"""Fixtures for the training reliability tests: a tiny Llama saved as a local HF folder with the embedded
SmolLM2 tokenizer, a small OpenAI-`messages` .jsonl file, a config, and a helper that runs the real CLI
(`python -m tunelab.cli train CFG`) in a subprocess, as a user would.

Every run uses one TUNELAB_CACHE under the session's tmp folder (prepared data is shared between runs: the
data cache key does not include train.output_dir) and OMP_NUM_THREADS=1 (2 shared cores).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

FAKE_HF_TOKEN = "hf_tunelabFakeTokenForLeakTest0123456789"
MAX_STEPS, SAVE_STEPS, EVAL_STEPS = 10, 2, 5
WORDS = "trip lisbon museum food train hotel beach city walk map plan day night river art coffee".split()


@dataclass
class Workspace:
    root: Path
    model_dir: Path
    data_file: Path
    cache: Path

    def config(self, output_dir: Path, name: str | None = None, at: Path | None = None, **sections) -> Path:
        """Write a config for a run in `output_dir` (next to it, or at `at`); `sections` merge over the defaults."""
        cfg = {
            "data": {"sources": [{"path": str(self.data_file)}], "val_fraction": 0.2, "dedup": {"near": False}},
            "model": {"name": str(self.model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "train": {
                "output_dir": str(output_dir), "max_steps": MAX_STEPS, "batch_size": 2, "grad_accum": 2,
                "save_steps": SAVE_STEPS, "save_total_limit": 2, "eval_steps": EVAL_STEPS, "max_seq_len": 48,
                "warmup_steps": 1, "lr": 1.0e-3, "precision": "fp32", "threads": 1, "seed": 7,
            },
            "eval": {"batch_size": 4, "max_val_rows": 6},
        }
        for section, values in sections.items():
            cfg[section].update(values)
        path = at or Path(output_dir).parent / f"{name or Path(output_dir).name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def env(self, fault: str | None = None, cache: Path | None = None, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TUNELAB_FAULT", "HF_TOKEN")}
        env.update(
            TUNELAB_CACHE=str(cache or self.cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false", HF_TOKEN=FAKE_HF_TOKEN, PYTHONUNBUFFERED="1", COLUMNS="200",
        )
        if fault:
            env["TUNELAB_FAULT"] = fault
        env.update(extra)
        return env


def train_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", "train", str(config), *args]


def tunelab_train(ws: Workspace, config: Path, *args: str, fault: str | None = None, cache: Path | None = None,
                  timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, *args), capture_output=True, text=True, timeout=timeout,
                          env=ws.env(fault, cache, **env), cwd=ws.root)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_clear_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one `error:` line, no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def adapter_file(run_dir: Path) -> Path:
    return Path(run_dir) / "adapter" / "adapter_model.safetensors"


def max_adapter_difference(a: Path, b: Path) -> float:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(torch.max(torch.abs(wa[k] - wb[k])).item() for k in wa)


def metric_steps(run_dir: Path) -> tuple[list[int], list[int]]:
    """(steps of the train-loss lines, steps of the validation lines) in file order."""
    train, val = [], []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        (val if "val_loss" in record else train).append(record["step"])
    return train, val


def assert_metrics_each_step_once(run_dir: Path) -> None:
    train, val = metric_steps(run_dir)
    assert train == list(range(1, MAX_STEPS + 1)), train
    assert val == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS)), val


def newest_valid_step(run_dir: Path) -> int | None:
    from tunelab.train.checkpoint import latest_valid_checkpoint

    found = latest_valid_checkpoint(run_dir, warn=lambda *_: None)
    return int(found.name.split("-")[1]) if found else None


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_chat_jsonl(path: Path, n: int = 48, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            messages = [{"role": "user", "content": f"q{i} {user}"}, {"role": "assistant", "content": f"a{i} {answer}"}]
            f.write(json.dumps({"messages": messages}) + "\n")


@pytest.fixture(scope="session")
def ws(tmp_path_factory) -> Workspace:
    """Tiny random Llama (vocab 49152, hidden 32, 2 layers) + the embedded SmolLM2 tokenizer, and 48 chats."""
    from tests.conftest import build_tiny_llama
    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    root = tmp_path_factory.mktemp("reliability")
    tokenizer = load_tokenizer(ModelConfig())  # the embedded SmolLM2 tokenizer (default cache)
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_file = root / "chats.jsonl"
    _write_chat_jsonl(data_file)
    return Workspace(root, model_dir, data_file, root / "cache")


@dataclass
class Reference:
    run_dir: Path
    config: Path
    result: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="session")
def reference(ws) -> Reference:
    """One uninterrupted run (with a fake HF_TOKEN in its environment): what every faulted run must equal."""
    run_dir = ws.root / "reference" / "run"
    config = ws.config(run_dir, name="reference")
    start = time.perf_counter()
    result = tunelab_train(ws, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return Reference(run_dir, config, result, time.perf_counter() - start)
