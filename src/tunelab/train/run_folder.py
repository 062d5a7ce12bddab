"""The run folder (`train.output_dir`): may this run use it, which config changes a resume tolerates, and one
clear line when writing to it fails."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.io import atomic_write, remove_leftovers

# Keys that may change between an interrupted run and its resumption without changing the maths.
RESUME_SAFE_TRAIN_KEYS = {
    "max_steps", "save_steps", "save_total_limit", "eval_steps", "logging_steps", "threads", "output_dir", "loss_chunk_tokens", "compile",
}


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Refuse an unusable run folder before anything is written (prepare_run_dir writes)."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir: {run_dir} exists and is not a folder")
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and not resume and not overwrite:
        raise UserError(f"{run_dir}: run folder already exists; pass --overwrite to replace it, or drop --no-resume to resume it")
    if existing and resume and (run_dir / "config.yaml").is_file():
        from tunelab.config import load_config

        difference = first_difference(load_config(run_dir / "config.yaml"), cfg)
        if difference:
            raise UserError(
                f"{run_dir}: holds a run with a different config ({difference}); use another train.output_dir, or --no-resume --overwrite"
            )
    return run_dir


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Create (or, without resume, recreate) the run folder, sweep a killed run's temp files, write config.yaml."""
    run_dir = check_run_dir(cfg, resume, overwrite)
    try:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder: {exc.strerror or exc}") from None
    return run_dir


def first_difference(old: Config, new: Config) -> str | None:
    """The first key (outside the resume-safe ones) whose value differs, as `section.key: old -> new`."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for section in ("data", "model", "lora", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if section == "train" and key in RESUME_SAFE_TRAIN_KEYS:
                continue
            if a[section].get(key) != b[section].get(key):
                return f"{section}.{key}: {a[section].get(key)!r} -> {b[section].get(key)!r}"
    return None


@contextlib.contextmanager
def write_failures_reported(run_dir: Path) -> Iterator[None]:
    """A failed write into the run folder (full disk, permissions) becomes one UserError line; bugs propagate."""
    try:
        yield
    except Exception as exc:
        from tunelab.train.checkpoint import write_failure_reason

        reason = None if isinstance(exc, UserError) else write_failure_reason(exc, run_dir)
        if reason is None:
            raise
        where = getattr(exc, "filename", None) or run_dir
        raise UserError(
            f"{where}: cannot write to the run folder: {reason} (checkpoints in {run_dir / 'checkpoints'} are intact; "
            "fix it and re-run the same command to resume)"
        ) from None
