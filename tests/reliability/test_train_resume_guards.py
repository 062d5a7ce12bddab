"""A resume never silently changes the run.

Resuming with a changed schedule, batch, seed or training data stops with exit 2 naming the change and writes
nothing; checkpoints that are all invalid stop the run instead of restarting it from step 0 (which would wipe
metrics.jsonl); `--extend` is the one way to continue a finished run, to a larger max_steps, and says how the
learning-rate schedule continues.
"""

from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import (
    MAX_STEPS,
    adapter_file,
    assert_one_clear_error,
    copy_run,
    metric_steps,
    tunelab_train,
)
from tunelab.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CHANGES = [
    ("max_steps", MAX_STEPS + 4),
    ("lr", 5.0e-4),
    ("scheduler", "cosine"),
    ("warmup_steps", 3),
    ("batch_size", 3),
    ("grad_accum", 1),
    ("seed", 8),
]


@pytest.mark.parametrize(("key", "value"), CHANGES, ids=[k for k, _ in CHANGES])
def test_resume_with_a_changed_training_setting_is_refused_naming_it(ws, reference, tmp_path, key, value):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    before = tree_bytes(run_dir)
    old = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))["train"][key]
    result = tunelab_train(ws, ws.config(run_dir, train={key: value}))
    assert_one_clear_error(result, f"different config (train.{key}: {old!r} -> {value!r})", "--no-resume --overwrite")
    assert tree_bytes(run_dir) == before


def test_resume_with_changed_training_data_is_refused_even_with_the_same_config(ws, reference, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(ws.data_file.read_text())
    config = ws.config(tmp_path / "run", data={"sources": [{"path": str(data)}]})
    started = tunelab_train(ws, config)
    assert started.returncode == 0, started.stderr[-3000:]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / f"step-{MAX_STEPS:06d}").rename(run_dir / "moved-away")  # interrupted after step 8

    # the same config file, the data file edited in place: every conversation's answer changes
    data.write_text(ws.data_file.read_text().replace('"content": "a', '"content": "A'))
    before = tree_bytes(run_dir)
    result = tunelab_train(ws, config)
    assert_one_clear_error(result, "the prepared training data changed since this run started")
    assert tree_bytes(run_dir) == before


def test_checkpoints_that_are_all_invalid_stop_the_run_instead_of_restarting_it(ws, reference, tmp_path):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    checkpoints = list_checkpoints(run_dir)
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        (ckpt / "manifest.json").unlink()  # as a run killed while writing each of them would leave it
    before = tree_bytes(run_dir)
    result = tunelab_train(ws, ws.config(run_dir))
    line = assert_one_clear_error(result, "no valid checkpoint to resume from", "--no-resume --overwrite")
    assert all(ckpt.name in line for ckpt in checkpoints)
    assert tree_bytes(run_dir) == before  # metrics.jsonl and the adapter kept, nothing restarted


def test_a_finished_run_with_fewer_steps_is_refused_and_extend_continues_it_to_more(ws, reference, tmp_path):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    before = tree_bytes(run_dir)
    shorter = tunelab_train(ws, ws.config(run_dir, train={"max_steps": MAX_STEPS - 4}))
    assert_one_clear_error(shorter, f"train.max_steps: {MAX_STEPS} -> {MAX_STEPS - 4}", "--extend")
    not_more = tunelab_train(ws, ws.config(run_dir, train={"max_steps": MAX_STEPS - 4}), "--extend")
    assert_one_clear_error(not_more, f"--extend needs more steps than the run's {MAX_STEPS}")
    assert tree_bytes(run_dir) == before

    extended = tunelab_train(ws, ws.config(run_dir, train={"max_steps": MAX_STEPS + 4}), "--extend")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"schedule is recomputed over {MAX_STEPS + 4} steps" in extended.stdout
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{MAX_STEPS:06d}'}" in extended.stdout
    train_steps, _ = metric_steps(run_dir)
    assert train_steps == list(range(1, MAX_STEPS + 5))  # the first steps kept, the new ones appended once
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == MAX_STEPS + 4
    assert adapter_file(run_dir).read_bytes() != adapter_file(reference.run_dir).read_bytes()
