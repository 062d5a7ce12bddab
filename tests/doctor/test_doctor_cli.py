"""`tunelab doctor CONFIG|RUN` and the doctor inside `tunelab train`: exit codes, the table, --json."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.helpers import conversations_file, save_tiny_llama_with_embedded_tokenizer
from tunelab.cli import app
from tunelab.errors import UserError
from tunelab.models.templates import TEMPLATE_DIR

DOUBLE_BOS = "{{ bos_token }}" + (TEMPLATE_DIR / "chatml.jinja").read_text()
CHECKS_BEFORE = ["labels", "bos token", "pad token", "template", "packing", "lora", "quantisation"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor-cli")
    save_tiny_llama_with_embedded_tokenizer(root / "model")
    (root / "double-bos.jinja").write_text(DOUBLE_BOS)
    return root, conversations_file(root, n=24)


def write_config(workspace, name: str, template: str = "chatml") -> tuple:
    root, data_file = workspace
    config = {
        "data": {"sources": [{"path": str(data_file)}], "val_fraction": 0.2, "dedup": {"near": False},
                 "output_dir": str(root / f"prepared-{name}")},
        "model": {"name": str(root / "model"), "chat_template": template},
        "lora": {"r": 4, "alpha": 8},
        "train": {"output_dir": str(root / f"run-{name}"), "max_steps": 2, "batch_size": 2, "save_steps": 2,
                  "eval_steps": 2, "max_seq_len": 64, "precision": "fp32", "threads": 1},
        "eval": {"prompts": [], "max_val_rows": 2},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, root / f"run-{name}"


def test_doctor_config_exits_0_on_a_good_config_and_2_on_a_double_bos_template(workspace, tmp_path):
    runner = CliRunner()
    good, _ = write_config(workspace, "good")
    result = runner.invoke(app, ["doctor", str(good), "--json", str(tmp_path / "good.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "good.json").read_text())
    assert [c["name"] for c in report["checks"]] == CHECKS_BEFORE
    assert report["counts"]["fail"] == 0 and report["stage"] == "before training"
    assert "tunelab doctor" in result.output and "PASS" in result.output

    bad, _ = write_config(workspace, "double-bos", str(workspace[0] / "double-bos.jinja"))
    result = runner.invoke(app, ["doctor", str(bad), "--json", str(tmp_path / "bad.json")])
    assert result.exit_code == 2, result.output
    failed = [c for c in json.loads((tmp_path / "bad.json").read_text())["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["bos token"] and failed[0]["advice"]
    assert "failed bos token" in result.output


def test_train_stops_on_a_doctor_failure_before_the_run_folder_and_no_doctor_skips_it(workspace):
    runner = CliRunner()
    bad, run_dir = write_config(workspace, "train-double-bos", str(workspace[0] / "double-bos.jinja"))
    result = runner.invoke(app, ["train", str(bad)])
    assert isinstance(result.exception, UserError), result.output
    assert "doctor: bos token failed before training" in str(result.exception)
    assert "FAIL" in result.output and not run_dir.exists()

    result = runner.invoke(app, ["train", str(bad), "--no-doctor"])
    assert result.exit_code == 0, result.output
    assert "doctor: pre-training checks skipped (--no-doctor)" in result.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_train_runs_the_doctor_first_and_trains_the_same_as_without_it(workspace):
    runner = CliRunner()
    good, run_dir = write_config(workspace, "train-good")
    result = runner.invoke(app, ["train", str(good)])
    assert result.exit_code == 0, result.output
    assert "doctor: 7 pre-training checks in" in result.output
    assert result.output.index("doctor: 7") < result.output.index("done:")
    skipped = runner.invoke(app, ["train", str(good), "--no-doctor", "--set", f"train.output_dir={run_dir}-plain"])
    assert skipped.exit_code == 0, skipped.output
    # The same training: the same random draws and weights; only float rounding may differ (the checks' forward
    # passes change which buffers later matmuls get; measured 1.5e-10 on weights of 0.18).
    from safetensors.torch import load_file

    adapter = "adapter/adapter_model.safetensors"
    with_doctor = load_file(str(run_dir / adapter))
    without = load_file(str(run_dir.parent / f"{run_dir.name}-plain" / adapter))
    assert with_doctor.keys() == without.keys()
    for name, weight in with_doctor.items():
        torch.testing.assert_close(weight, without[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.slow
def test_doctor_run_exits_0_on_a_good_export_and_2_on_a_gguf_with_another_template(stopping, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.export.gguf import convert_hf_to_gguf
    from tunelab.models.templates import resolve_chat_template

    runner = CliRunner()
    result = runner.invoke(
        app, ["doctor", str(stopping / "run"), "--threads", "1", "--json", str(tmp_path / "ok.json")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["stage"] == "after training" and report["counts"]["fail"] == 0
    assert {c["name"] for c in report["checks"]} >= {
        "gguf template",
        "llama.cpp tokens",
        "stops at turn end",
        "quant f16",
    }

    run = tmp_path / "run"
    shutil.copytree(stopping / "run", run)
    other = tmp_path / "merged-chatml"
    shutil.copytree(run / "export" / "merged", other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = resolve_chat_template("chatml", tokenizer)
    tokenizer.save_pretrained(other)
    convert_hf_to_gguf(other, run / "export" / "model-f16.gguf")
    result = runner.invoke(app, ["doctor", str(run), "--threads", "1", "--json", str(tmp_path / "bad.json")])
    assert result.exit_code == 2, result.output
    failed = {c["name"] for c in json.loads((tmp_path / "bad.json").read_text())["checks"] if c["status"] == "fail"}
    assert {"gguf template", "llama.cpp tokens"} <= failed


def test_doctor_on_a_folder_that_is_not_a_run_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["doctor", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "not a run folder" in str(result.exception)
