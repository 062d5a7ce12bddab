"""Fixtures for the training reliability tests: a tiny Llama saved as a local HF folder with the embedded
SmolLM2 tokenizer, a small OpenAI-`messages` .jsonl file, a config, and a helper that runs the real CLI
(`python -m tunelab.cli train CFG`) in a subprocess, as a user would.

Every run uses one TUNELAB_CACHE under the session's tmp folder (prepared data is shared between runs: the
data cache key does not include train.output_dir) and OMP_NUM_THREADS=1 (2 shared cores).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Workspace, build_tiny_llama, tunelab_train, write_chat_jsonl


@pytest.fixture(scope="session")
def ws(tmp_path_factory) -> Workspace:
    """Tiny random Llama (vocab 49152, hidden 32, 2 layers) + the embedded SmolLM2 tokenizer, and 48 chats."""
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
    write_chat_jsonl(data_file)
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
