"""The run folder (`train.output_dir`): may this run use it, which config changes a resume tolerates, and one
clear line when writing to it fails."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from tunelab.config import Config, TrainConfig
from tunelab.errors import UserError
from tunelab.io import atomic_write, remove_leftovers

# Train keys that may change between an interrupted run and its resumption without changing the maths:
# declared on the fields themselves (config.py, json_schema_extra={"resume_safe": True}). `max_steps` is not one of
# them (the learning-rate schedule depends on it): it may grow only when the user asks with --extend.
RESUME_SAFE_TRAIN_KEYS = frozenset(
    name for name, field in TrainConfig.model_fields.items() if (field.json_schema_extra or {}).get("resume_safe")
)
DATA_RECORD = "data.json"  # the training data a run was started on (fingerprint of the prepared rows, in order)


def check_run_dir(cfg: Config, resume: bool, overwrite: bool, extend: bool = False) -> Path:
    """Refuse an unusable run folder before anything is written (prepare_run_dir writes).

    A resume never silently changes the run: a changed key (outside the resume-safe ones), a changed `max_steps`
    without --extend, or checkpoints none of which is valid all stop here with one line."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir: {run_dir} exists and is not a folder")
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and not resume and not overwrite:
        raise UserError(
            f"{run_dir}: run folder already exists; pass --overwrite to replace it, or drop --no-resume to resume it"
        )
    if existing and resume and (run_dir / "config.yaml").is_file():
        from tunelab.config import load_config

        old = load_config(run_dir / "config.yaml")
        difference = first_difference(old, cfg, ignore_max_steps=extend)
        if difference:
            hint = " (--extend continues it to a larger max_steps)" if difference.startswith("train.max_steps") else ""
            raise UserError(
                f"{run_dir}: holds a run with a different config ({difference}){hint}; use another train.output_dir, "
                "or --no-resume --overwrite to start over"
            )
        if extend and cfg.train.max_steps <= old.train.max_steps:
            raise UserError(
                f"train.max_steps: --extend needs more steps than the run's {old.train.max_steps} "
                f"(got {cfg.train.max_steps})"
            )
    if existing and resume:
        _check_some_checkpoint_is_valid(run_dir)
    return run_dir


def _check_some_checkpoint_is_valid(run_dir: Path) -> None:
    """Checkpoints exist but none can be loaded: restarting from step 0 would wipe the run's metrics, so stop."""
    from tunelab.train.checkpoint import latest_valid_checkpoint, list_checkpoints

    found = list_checkpoints(run_dir)
    if found and latest_valid_checkpoint(run_dir, warn=lambda *_: None) is None:
        names = ", ".join(p.name for p in found)
        raise UserError(
            f"{run_dir / 'checkpoints'}: no valid checkpoint to resume from ({names} are all incomplete or corrupt); "
            "move them away to keep them, or --no-resume --overwrite to start over"
        )


def data_fingerprint(train_set) -> str:
    """The prepared training rows, in order (content hash of each conversation + its token count)."""
    digest = hashlib.sha256()
    for row_id, tokens in zip(train_set["id"], train_set["num_tokens"]):
        digest.update(f"{row_id}:{tokens}\n".encode())
    return digest.hexdigest()[:16]


def check_same_data(cfg: Config, fingerprint: str, resume: bool) -> None:
    """A resume must train on the rows the run started with (a data file edited in place changes them)."""
    record = Path(cfg.train.output_dir) / DATA_RECORD
    if not (resume and record.is_file()):
        return
    started_on = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
    if started_on != fingerprint:
        raise UserError(
            f"{record.parent}: the prepared training data changed since this run started (fingerprint {started_on} -> "
            f"{fingerprint}); restore the data, use another train.output_dir, or --no-resume --overwrite to start over"
        )


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool, data_print: str, extend: bool = False) -> Path:
    """Create (or, without resume, recreate) the run folder, sweep a killed run's temp files, write config.yaml
    and the data record."""
    run_dir = check_run_dir(cfg, resume, overwrite, extend)
    try:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        if not (run_dir / DATA_RECORD).is_file():
            atomic_write(run_dir / DATA_RECORD, json.dumps({"fingerprint": data_print}))
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write the run folder: {exc.strerror or exc}") from None
    return run_dir


def first_difference(old: Config, new: Config, ignore_max_steps: bool = False) -> str | None:
    """The first key (outside the resume-safe ones) whose value differs, as `section.key: old -> new`."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for section in ("data", "model", "lora", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if section == "train" and (key in RESUME_SAFE_TRAIN_KEYS or (ignore_max_steps and key == "max_steps")):
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
