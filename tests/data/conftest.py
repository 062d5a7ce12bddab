"""Helpers for the data-stage tests: tiny files in tmp_path, the embedded SmolLM2 tokenizer (cached on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import Config, ModelConfig, config_from_dict


@pytest.fixture(scope="session")
def chatml_tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def llama_tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer(ModelConfig(chat_template="llama-3.1"))


def make_config(tmp_path: Path, sources: list[dict], **data) -> Config:
    data = {"sources": sources, "output_dir": str(tmp_path / "prepared"), **data}
    data.setdefault("dedup", {"near": False})
    return config_from_dict({"data": data, "train": {"max_seq_len": 256}})


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, values) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
    return path


def sharegpt(q: str, a: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}


def qa_rows(n: int, tag: str = "q") -> list[dict]:
    """n distinct, clearly different conversations (so near-dedup leaves them alone)."""
    words = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "glass", "north", "candle", "mirror", "forest"]
    return [
        sharegpt(
            f"{tag}{i}: tell me about the {words[i % len(words)]} number {i} and {words[(i * 7 + 3) % len(words)]}",
            f"The {words[i % len(words)]} {i} is {' '.join(words[(i + j) % len(words)] for j in range(i % 5 + 3))}.",
        )
        for i in range(n)
    ]
