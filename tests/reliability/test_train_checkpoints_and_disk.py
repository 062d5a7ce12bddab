"""Corrupt checkpoints are skipped with a warning naming them; a full disk or an unwritable run folder gives one
clear `error:` line (exit 2) and leaves the existing checkpoints intact; the next run resumes from them."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tests.helpers import (
    MAX_STEPS,
    adapter_file,
    assert_metrics_each_step_once,
    assert_one_clear_error,
    copy_run,
    max_adapter_difference,
    newest_valid_step,
    tunelab_train,
)
from tunelab.train.checkpoint import list_checkpoints, verify_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _missing_file(ckpt):
    (ckpt / "optimizer.pt").unlink()
    return "missing optimizer.pt"


def _bad_bytes(ckpt):
    path = ckpt / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # same size, different bytes
    path.write_bytes(bytes(data))
    return "adapter/adapter_model.safetensors fails its checksum"


def _truncated(ckpt):
    path = ckpt / "rng.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "rng.pt has the wrong size"


def _no_manifest(ckpt):  # a half-written folder: the manifest is written last
    (ckpt / "manifest.json").unlink()
    return "no manifest"


@pytest.mark.parametrize("corrupt", [_missing_file, _bad_bytes, _truncated, _no_manifest], ids=lambda f: f.__name__[1:])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning_and_the_previous_one_used(
    ws, reference, tmp_path, corrupt
):
    run_dir = copy_run(reference.run_dir, tmp_path / "run")
    newest = run_dir / "checkpoints" / f"step-{MAX_STEPS:06d}"
    reason = corrupt(newest)
    result = tunelab_train(ws, ws.config(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: skipping corrupt checkpoint {newest}: {reason}" in result.stdout, result.stdout[-2000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{MAX_STEPS - 2:06d}'}" in result.stdout
    assert max_adapter_difference(adapter_file(run_dir), adapter_file(reference.run_dir)) <= 1e-6
    assert_metrics_each_step_once(run_dir)
    assert verify_checkpoint(newest) is None  # rewritten whole


def _checkpoint_digests(run_dir):
    return {p.name: (p / "manifest.json").read_bytes() for p in list_checkpoints(run_dir)}


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("checkpoint_files:6:enospc", "No space left on device"),
        ("metrics:7:enospc", "No space left on device"),
        ("checkpoint_manifest:6:eacces", "Permission denied"),
        ("final_save:10:erofs", "Read-only file system"),
    ],
)
def test_injected_disk_errors_give_one_clear_message_and_keep_checkpoints(ws, reference, tmp_path, fault, reason):
    run_dir = tmp_path / "run"
    config = ws.config(run_dir)
    result = tunelab_train(ws, config, fault=fault)
    assert_one_clear_error(result, reason, "intact", "re-run the same command to resume")
    before = _checkpoint_digests(run_dir)
    assert before and all(verify_checkpoint(p) is None for p in list_checkpoints(run_dir))
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "half-written checkpoint left behind"
    again = tunelab_train(ws, config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_adapter_difference(adapter_file(run_dir), adapter_file(reference.run_dir)) <= 1e-6
    assert_metrics_each_step_once(run_dir)


def test_output_dir_under_a_regular_file_is_one_clear_error_and_nothing_written(ws, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = tunelab_train(ws, ws.config(blocker / "run", at=tmp_path / "cfg.yaml"))
    assert_one_clear_error(result, str(blocker / "run"), "Not a directory")
    assert blocker.read_text() == "x"


# ------------------------------------------------------------ real full disk / read-only disk (tmpfs)
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (needs root / CAP_SYS_ADMIN; skipped elsewhere; the injected-fault tests above still run)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root or no CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder, ballast, leave: int = 0):
    """Fill the file system of `folder`, then give back `leave` bytes (a real ENOSPC a few writes later)."""
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(ballast, max(os.path.getsize(ballast) - leave, 0))


def test_real_full_disk_mid_run_gives_one_clear_message_and_resumes_after_space_is_freed(ws, reference, small_disk):
    run_dir = small_disk / "run"
    config = ws.config(run_dir, name="cfg")
    # Train to step 6 (checkpoints 4 and 6 on disk), then fill the disk but for 16 KiB and ask for the full run:
    # config.yaml and a few metrics lines still fit, checkpoint 8 does not.
    first = tunelab_train(ws, config, fault="checkpoint_renamed:6")
    assert first.returncode == -9
    ballast = small_disk / f"ballast-{uuid.uuid4().hex}"
    _fill(small_disk, ballast, leave=16 * 1024)
    before = _checkpoint_digests(run_dir)
    full = tunelab_train(ws, config)
    line = assert_one_clear_error(full, "No space left on device", "intact")
    print(line)
    assert _checkpoint_digests(run_dir) == before and all(
        verify_checkpoint(p) is None for p in list_checkpoints(run_dir)
    )
    assert newest_valid_step(run_dir) == 6, line
    ballast.unlink()
    again = tunelab_train(ws, config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"step-{6:06d}" in again.stdout
    assert max_adapter_difference(adapter_file(run_dir), adapter_file(reference.run_dir)) <= 1e-6
    assert_metrics_each_step_once(run_dir)


def test_read_only_run_folder_gives_one_clear_message_and_keeps_checkpoints(ws, reference, small_disk):
    run_dir = small_disk / "run"
    config = ws.config(run_dir, name="cfg")
    assert tunelab_train(ws, config, fault="metrics:5").returncode == -9
    before = _checkpoint_digests(run_dir)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        result = tunelab_train(ws, config)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert_one_clear_error(result, "Read-only file system")
    assert _checkpoint_digests(run_dir) == before
    again = tunelab_train(ws, config)
    assert again.returncode == 0 and "step-000004" in again.stdout, again.stderr[-3000:]
    assert max_adapter_difference(adapter_file(run_dir), adapter_file(reference.run_dir)) <= 1e-6
