"""`tunelab train` as a user runs it: bad configuration fails in one line with exit 2 and writes nothing; the
same config + seed gives identical adapter bytes; a finished run is reported complete; --no-resume refuses an
existing run unless --overwrite; the HF token never reaches the run folder, the data cache or the logs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.helpers import (
    FAKE_HF_TOKEN,
    MAX_STEPS,
    adapter_file,
    assert_metrics_each_step_once,
    assert_one_clear_error,
    copy_run,
    tunelab_train,
    tunelab_train_here,
)

pytestmark = pytest.mark.timeout(900)


def _tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------- bad configuration
BAD_CONFIGS = [
    # (id, config change as {section: {key: value}} or a raw YAML edit, expected text in the one error line)
    (
        "missing-data-file",
        {"data": {"sources": [{"path": "/nonexistent/chats.jsonl"}]}},
        "/nonexistent/chats.jsonl: file not found",
    ),
    ("unknown-chat-template", {"model": {"chat_template": "vicuna"}}, "model.chat_template: unknown template `vicuna`"),
    (
        "missing-model-folder",
        {"model": {"name": "/nonexistent/model"}},
        "model.name: folder not found: /nonexistent/model",
    ),
    ("unknown-key", {"train": {"max_stpes": 3}}, "train.max_stpes: unknown key (did you mean `max_steps`?)"),
    ("wrong-type", {"train": {"batch_size": "four"}}, "train.batch_size: Input should be a valid integer"),
    ("lr<=0", {"train": {"lr": 0}}, "train.lr: must be > 0"),
    ("r<=0", {"lora": {"r": 0}}, "lora.r: must be > 0"),
    ("alpha<=0", {"lora": {"alpha": -1}}, "lora.alpha: must be > 0"),
    ("steps<=0", {"train": {"max_steps": 0}}, "train.max_steps: must be > 0"),
]


@pytest.mark.parametrize("change, expected", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2_and_nothing_written(ws, tmp_path, change, expected):
    run_dir = tmp_path / "run"
    config = ws.config(run_dir, name="cfg", **change)
    cache = tmp_path / "cache"
    result = tunelab_train(ws, config, cache=cache, timeout=300)
    assert_one_clear_error(result, expected)
    assert not run_dir.exists(), "run folder created for a bad config"
    assert not (cache / "data").exists(), "prepared data written for a bad config"


def test_tokenizer_without_chat_template_is_one_line_and_nothing_written(ws, tmp_path):
    bare = shutil.copytree(ws.model_dir, tmp_path / "bare-model")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    run_dir = tmp_path / "run"
    result = tunelab_train(ws, ws.config(run_dir, name="cfg", model={"name": str(bare)}), cache=tmp_path / "cache")
    assert_one_clear_error(result, "model.chat_template: the tokenizer has no chat template; set one of chatml")
    assert not run_dir.exists() and not (tmp_path / "cache" / "data").exists()


@pytest.mark.parametrize(
    "keys, broken, expected",
    [
        ({"model": {"load_in_4bit": True}}, "functional.quantize_4bit", "model.load_in_4bit: bitsandbytes"),
        ({"train": {"optimizer": "adamw_8bit"}}, "optim.AdamW8bit.step", "train.optimizer: adamw_8bit: bitsandbytes"),
    ],
    ids=["4bit", "adamw_8bit"],
)
def test_a_bitsandbytes_op_missing_is_one_line_and_nothing_written(ws, tmp_path, monkeypatch, keys, broken, expected):
    """A machine whose bitsandbytes lacks an op (simulated: the op raises as a missing kernel does) fails before
    anything is written, in one line naming the op."""
    import operator

    import bitsandbytes

    from tunelab.models.quantization import missing_op

    def missing(*args, **kwargs):
        raise NotImplementedError("no kernel registered for this device")

    owner, attr = broken.rsplit(".", 1)
    monkeypatch.setattr(operator.attrgetter(owner)(bitsandbytes), attr, missing)
    run_dir = tmp_path / "run"
    missing_op.cache_clear()  # the probe's answer is kept per process: this one must ask the broken library
    try:
        result = tunelab_train_here(ws, ws.config(run_dir, name="cfg", **keys), cache=tmp_path / "cache")
    finally:
        missing_op.cache_clear()
    line = assert_one_clear_error(result, expected, "no kernel registered for this device")
    assert "cannot run" in line
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------ determinism, reruns
def test_same_config_and_seed_give_identical_adapter_bytes(ws, reference, tmp_path):
    run_dir = tmp_path / "run"
    result = tunelab_train(ws, ws.config(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert adapter_file(run_dir).read_bytes() == adapter_file(reference.run_dir).read_bytes()
    assert_metrics_each_step_once(run_dir)


def test_rerunning_a_finished_run_says_complete_and_changes_nothing_that_matters(ws, reference, tmp_path):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    checkpoints = _tree_digest(run_dir / "checkpoints")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    result = tunelab_train(ws, ws.config(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"run already complete: {run_dir / 'checkpoints' / f'step-{MAX_STEPS:06d}'} is step {MAX_STEPS} of {MAX_STEPS}"
        in result.stdout
    )
    assert "resuming from" not in result.stdout
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # no step (or evaluation) logged twice
    assert _tree_digest(run_dir / "checkpoints") == checkpoints
    assert adapter_file(run_dir).read_bytes() == adapter_file(reference.run_dir).read_bytes()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == json.loads((reference.run_dir / "summary.json").read_text())["final_val_loss"]


def test_no_resume_refuses_an_existing_run_unless_overwrite(ws, reference, tmp_path):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    config = ws.config(run_dir)
    before = _tree_digest(run_dir)
    refused = tunelab_train(ws, config, "--no-resume")
    assert_one_clear_error(refused, f"{run_dir}: run folder already exists; pass --overwrite")
    assert _tree_digest(run_dir) == before
    (run_dir / "checkpoints" / f"step-{MAX_STEPS:06d}" / "optimizer.pt").write_bytes(b"stale")  # must not be reused
    fresh = tunelab_train(ws, config, "--no-resume", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming from" not in fresh.stdout and "warning" not in fresh.stdout
    assert adapter_file(run_dir).read_bytes() == adapter_file(reference.run_dir).read_bytes()
    assert_metrics_each_step_once(run_dir)


def test_resume_with_a_changed_config_is_refused_and_nothing_written(ws, reference, tmp_path):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    before = _tree_digest(run_dir)
    result = tunelab_train(ws, ws.config(run_dir, lora={"r": 8}))
    assert_one_clear_error(result, "holds a run with a different config (lora.r: 4 -> 8)")
    assert _tree_digest(run_dir) == before


# ------------------------------------------------------------------------------------------- secrets
def test_hf_token_never_written_to_run_folder_data_cache_or_logs(ws, reference):
    """The reference run had HF_TOKEN set (a fake one); no byte of it may appear anywhere we wrote."""
    token = FAKE_HF_TOKEN.encode()
    places = [reference.run_dir, ws.cache, reference.config.parent]
    scanned = 0
    for folder in places:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            assert token not in path.read_bytes(), path
            scanned += 1
    assert FAKE_HF_TOKEN not in reference.result.stdout and FAKE_HF_TOKEN not in reference.result.stderr
    assert scanned > 20
    assert "hf_" not in (reference.run_dir / "config.yaml").read_text()  # no token-like value in the saved config
