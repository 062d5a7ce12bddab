"""The CLI as a user runs it: help everywhere, one-line errors with exit code 2, resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import fresh_cache

COMMANDS = [
    [],
    ["config", "show"],
    ["data", "prepare"],
    ["data", "travel"],
    ["train"],
    ["eval"],
    ["export"],
    ["chat"],
    ["serve"],
    ["sweep"],
    ["report"],
    ["promote"],
    ["bench", "train"],
    ["bench", "data"],
    ["bench", "infer"],
    ["bench", "serve"],
    ["quickstart"],
    ["doctor"],
    ["feedback", "export"],
]


def tunelab(*args, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def leaf_commands(group, prefix=()) -> set[tuple[str, ...]]:
    found = set()
    for name, command in group.commands.items():
        path = (*prefix, name)
        found |= leaf_commands(command, path) if hasattr(command, "commands") else {path}  # a group: its commands
    return found


def test_every_command_is_listed_here():
    """COMMANDS (help on each) names every command the CLI registers, so a new command cannot go untested here."""
    import typer

    from tunelab.cli import app

    assert leaf_commands(typer.main.get_command(app)) == {tuple(c) for c in COMMANDS if c}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_on_every_command(command):
    result = tunelab(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_config_error_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: 0\n")
    result = tunelab("train", str(cfg))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {cfg}: train.lr: must be > 0 (got 0)"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: 0\n")
    result = tunelab("--debug", "train", str(cfg))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_config_show_applies_overrides():
    result = tunelab("config", "show", "configs/quickstart.yaml", "--set", "train.lr=1e-4", "--set", "lora.r=4")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0001" in result.stdout and "r: 4" in result.stdout


def test_the_3b_qlora_config_is_the_1b_recipe_with_another_model():
    """So the run below stands for both shipped QLoRA configs."""
    from tunelab.config import load_config

    one, three = (load_config(f"configs/llama32-{size}-qlora.yaml").model_dump() for size in ("1b", "3b"))
    assert three["model"].pop("name").endswith("Llama-3.2-3B-Instruct") and three["train"].pop("output_dir")
    one["model"].pop("name"), one["train"].pop("output_dir")
    assert one == three


def test_shipped_qlora_config_trains_on_this_machine(tmp_path, monkeypatch, capsys):
    """The seeds' recipe as shipped (4-bit NF4 base, double quant, adamw_8bit, gradient checkpointing, packing,
    seq 2048, batch 2 x 4) trains with bitsandbytes on a CPU. Overridden: the model (a tiny random-init Llama with
    the real Llama-3.2 tokenizer, saved locally: no Hub here), the data (FineTome-100k is on the Hub: the same
    ShareGPT format from a local file) and max_steps (2 of 60, to keep the test short)."""
    import json

    from tests.helpers import llama32_shaped_folder, qa_rows, run_tunelab, write_jsonl

    model_dir = llama32_shaped_folder(tmp_path / "llama32-tiny", hidden_size=64)
    data = write_jsonl(tmp_path / "finetome-like.jsonl", qa_rows(300))
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # the config's output_dir is relative: runs/llama32-1b-qlora
    monkeypatch.setenv("TUNELAB_CACHE", str(fresh_cache(tmp_path / "cache")))
    result = run_tunelab(
        capsys,
        "train",
        str(root / "configs/llama32-1b-qlora.yaml"),
        "--set",
        f"model.name={model_dir}",
        "--set",
        f"data.sources=[{{path: {data}, format: sharegpt}}]",
        "--set",
        "train.max_steps=2",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = next(text for text in result.stdout.splitlines() if text.startswith("architecture:"))
    assert "fast path (packed attention" in line and "4-bit nf4 base" in line and "double quant" in line
    run_dir = tmp_path / "runs" / "llama32-1b-qlora"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["global_batch"] == 8 and summary["final_val_loss"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
