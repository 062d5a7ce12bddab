"""SIGKILL `tunelab train` anywhere, re-run the same command: it resumes from the newest valid checkpoint, says
so, and ends with the adapter of an uninterrupted run; metrics.jsonl has every step exactly once.

Precise kill points use the test-only hook `tunelab.train.faults.maybe_inject_fault` (env TUNELAB_FAULT);
random ones use Popen.kill() at random moments while the run is training.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time

import pytest

from tests.helpers import (
    MAX_STEPS,
    adapter_file,
    assert_metrics_each_step_once,
    max_adapter_difference,
    newest_valid_step,
    train_cmd,
    tunelab_train,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RESUMED = re.compile(r"resuming from (\S+/step-(\d{6}))")

# (kill point, the checkpoint the next run must resume from). Run k+1 is a resume of run k: a chain.
KILL_CHAIN = [
    ("step:3", 2),  # between steps: weights of step 3 updated, nothing recorded
    ("checkpoint_files:4", 2),  # inside the checkpoint write: adapter + optimizer.pt written, no manifest
    ("eval:5", 4),  # during evaluation (loss computed, not recorded)
    ("checkpoint_manifest:6", 4),  # checkpoint complete with manifest, not yet renamed into place
    ("checkpoint_renamed:6", 6),  # renamed into place, older checkpoints not yet pruned
    ("metrics:7", 6),  # step 7 logged to metrics.jsonl, no checkpoint of it
    ("final_save:10", None),  # training done, final adapter written, tokenizer/summary not yet
]


def resumed_step(stdout: str) -> int | None:
    match = RESUMED.search(stdout)
    return int(match.group(2)) if match else None


def test_kill_at_precise_points_then_resume_matches_uninterrupted_run(ws, reference, tmp_path):
    run_dir = tmp_path / "run"
    config = ws.config(run_dir)
    expected_resume, best_valid = None, None
    for fault, next_resume in KILL_CHAIN:
        result = tunelab_train(ws, config, fault=fault)
        assert result.returncode == -9, (fault, result.returncode, result.stderr[-2000:])
        assert resumed_step(result.stdout) == expected_resume, (fault, result.stdout[-2000:])
        # The last good checkpoint never disappears: the newest valid one only moves forward.
        valid = newest_valid_step(run_dir)
        assert valid is not None and (best_valid is None or valid >= best_valid), (fault, valid, best_valid)
        best_valid, expected_resume = valid, next_resume
    final = tunelab_train(ws, config)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "run already complete" in final.stdout and f"step {MAX_STEPS} of {MAX_STEPS}" in final.stdout
    difference = max_adapter_difference(adapter_file(run_dir), adapter_file(reference.run_dir))
    assert difference <= 1e-6
    print(
        f"{len(KILL_CHAIN)} precise kills survived; max |diff| vs uninterrupted {difference:g}; "
        f"bytes identical: {adapter_file(run_dir).read_bytes() == adapter_file(reference.run_dir).read_bytes()}"
    )
    assert_metrics_each_step_once(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["steps"] == MAX_STEPS
        and summary["tokens"] == json.loads((reference.run_dir / "summary.json").read_text())["tokens"]
    )
    leftovers = [p for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def _kill_while_training(ws, config, run_dir, rng: random.Random) -> tuple[int | None, str]:
    """Start a run; once it has logged a step beyond what metrics.jsonl held at start, wait a random 0-0.3 s
    (steps take ~0.1 s here, so this lands in steps, evaluation and checkpoint writes alike) and SIGKILL it."""
    metrics = run_dir / "metrics.jsonl"

    def logged_steps() -> list[int]:
        try:
            return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
        except (OSError, ValueError):
            return []

    before = max(logged_steps(), default=0)
    target = min(before + rng.randint(1, 2), MAX_STEPS)
    delay = rng.uniform(0.0, 0.3)
    proc = subprocess.Popen(
        train_cmd(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ws.env(), cwd=ws.root
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if max(logged_steps(), default=0) >= target:
            time.sleep(delay)
            break
        time.sleep(0.02)
    proc.kill()
    out, err = proc.communicate()
    return proc.returncode, out


def test_kill_at_random_moments_then_resume_matches_uninterrupted_run(ws, reference, tmp_path):
    seed = 20240601
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    config = ws.config(run_dir)
    kills, best_valid, landed = 0, None, []
    for _ in range(4):
        code, _out = _kill_while_training(ws, config, run_dir, rng)
        if code == 0:
            break  # finished before the kill landed: nothing left to interrupt
        assert code == -9
        kills += 1
        valid = newest_valid_step(run_dir)
        if best_valid is not None:
            assert valid is not None and valid >= best_valid, (seed, valid, best_valid)
        best_valid = valid
        landed.append(valid)
        if valid == MAX_STEPS:
            break  # only the final save was left: further kills would land in start-up
    final = tunelab_train(ws, config)
    assert final.returncode == 0, final.stderr[-3000:]
    if best_valid is not None and best_valid < MAX_STEPS:
        assert resumed_step(final.stdout) == best_valid, final.stdout[-2000:]
    assert kills >= 1, "no kill landed"
    difference = max_adapter_difference(adapter_file(run_dir), adapter_file(reference.run_dir))
    assert difference <= 1e-6, seed
    assert_metrics_each_step_once(run_dir)
    print(
        f"random kills (seed {seed}): {kills}, newest valid checkpoint after each: {landed}; max |diff| {difference:g}"
    )
