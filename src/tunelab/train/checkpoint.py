"""Atomic, verifiable checkpoints.

A checkpoint is `RUN/checkpoints/step-NNNNNN/` holding the adapter (PEFT format), optimizer and scheduler
state, RNG states and `state.json` (step, tokens seen, the fp16 loss scale, ...). It is written into a
temporary sibling folder, every file is fsynced, `manifest.json` (size + sha256 of every file) is written
last, then the folder is renamed into place. A folder without a valid manifest is never trusted: on resume we take
the newest checkpoint whose manifest matches its files and warn about the ones skipped. Old checkpoints are deleted
only after the new one is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from tunelab.errors import UserError
from tunelab.io import fsync_dir, fsync_tree
from tunelab.train.faults import maybe_inject_fault

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointWriteError(UserError):
    pass


def write_failure_reason(exc: BaseException, folder: Path) -> str | None:
    """One-line reason if `exc` is a failed write (full disk, permissions), else None (a real bug: re-raise).

    A full disk does not always surface as OSError: torch.save raises RuntimeError ("unexpected pos ...")
    and safetensors its own SafetensorError ("I/O error: No space left on device").
    """
    from safetensors import SafetensorError

    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if not isinstance(exc, (RuntimeError, SafetensorError)):
        return None
    text = str(exc)
    if "No space left" in text or "os error 28" in text:
        return os.strerror(errno.ENOSPC)
    if isinstance(exc, SafetensorError) or "inline_container" in text or "file write failed" in text:
        try:
            if shutil.disk_usage(folder).free < (1 << 20):
                return os.strerror(errno.ENOSPC)
        except OSError:
            pass
        return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return None


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep` valid ones."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        maybe_inject_fault("checkpoint_files", step)  # some files written, no manifest yet
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        fsync_tree(tmp)
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"step": step, "files": files}, indent=2))
        with open(manifest, "rb") as f:
            os.fsync(f.fileno())
        maybe_inject_fault("checkpoint_manifest", step)  # complete, not yet renamed into place
        if final.exists():  # a stale one from a run that died after renaming; ours is newer
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        maybe_inject_fault("checkpoint_renamed", step)  # in place, older ones not yet pruned
    except Exception as exc:
        reason = write_failure_reason(exc, root)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"{root}: cannot write checkpoint step {step}: {reason} (existing checkpoints are intact; "
            "fix it and re-run the same command to resume)"
        ) from None
    prune_checkpoints(run_dir, keep)
    return final


def verify_checkpoint(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return "unreadable manifest"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has the wrong size"
        if _sha256(path) != meta["sha256"]:
            return f"{name} fails its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first (valid or not; temporary folders excluded)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def latest_valid_checkpoint(run_dir: Path, warn=print) -> Path | None:
    for folder in list_checkpoints(run_dir):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        warn(f"warning: skipping corrupt checkpoint {folder}: {problem}")
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` valid checkpoints; drop older ones, invalid ones and leftover temp folders."""
    valid = 0
    for folder in list_checkpoints(run_dir):
        if verify_checkpoint(folder) is None and valid < keep:
            valid += 1
            continue
        if valid >= 1:  # never delete anything until a newer valid checkpoint exists
            shutil.rmtree(folder, ignore_errors=True)
    root = checkpoint_root(run_dir)
    for leftover in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return state.json."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    return json.loads((folder / "state.json").read_text())
