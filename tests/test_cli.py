"""The CLI as a user runs it: help everywhere, one-line errors with exit code 2, resolved config."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    [],
    ["config", "show"],
    ["data", "prepare"],
    ["train"],
    ["eval"],
    ["export"],
    ["chat"],
    ["serve"],
    ["sweep"],
    ["bench", "train"],
    ["bench", "data"],
    ["bench", "infer"],
    ["quickstart"],
    ["doctor"],
    ["feedback", "export"],
]


def tunelab(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, timeout=120, **kw
    )


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


@pytest.mark.parametrize("config", ["configs/llama32-1b-qlora.yaml", "configs/llama32-3b-qlora.yaml"])
def test_cuda_only_configs_fail_early_on_cpu(config, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the 4-bit path is exercised instead")
    result = tunelab("train", config, "--set", f"train.output_dir={tmp_path}/run")
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
