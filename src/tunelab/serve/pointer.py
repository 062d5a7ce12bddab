"""The `current` pointer of a serve folder: which model `tunelab serve DIR` (and the Space bundle) serves.

    DIR/current.json   {"model": "/abs/path/model-q4_k_m.gguf or run folder", "model_hash": "sha256:...",
                        "promoted_at": "...", "report": "/abs/path/decision.md", "history": [older entries]}

`tunelab promote` writes it (temp file + fsync + rename: a reader sees the old or the new pointer, never half of
one) and pushes the replaced entry onto `history`, so `tunelab promote --rollback` is one command away.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.io import atomic_write

POINTER_NAME = "current.json"


def pointer_path(serve_dir: str | Path) -> Path:
    return Path(serve_dir) / POINTER_NAME


def has_pointer(path: str | Path) -> bool:
    return Path(path).is_dir() and pointer_path(path).is_file()


def read_pointer(serve_dir: str | Path) -> dict[str, Any]:
    path = pointer_path(serve_dir)
    if not path.is_file():
        raise UserError(
            f"{path}: no current model yet (run `tunelab promote CANDIDATE --over CURRENT --serve-dir {serve_dir}`)"
        )
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid pointer file ({exc})") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("model"), str):
        raise UserError(f"{path}: needs a string `model`")
    pointer.setdefault("history", [])
    return pointer


def resolve_model(path: str | Path) -> Path:
    """A serve folder resolves to the model its pointer names; anything else is returned unchanged."""
    path = Path(path)
    if not has_pointer(path):
        return path
    model = Path(read_pointer(path)["model"])
    if not model.exists():
        raise UserError(f"{pointer_path(path)}: points at {model}, which does not exist")
    return model


def _write_pointer(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def point_to(
    serve_dir: str | Path, model: str | Path, model_hash: str | None, report: str | Path | None
) -> dict[str, Any]:
    """Make `model` current; the entry it replaces goes onto the history."""
    entry = {
        "model": str(Path(model).resolve()),
        "model_hash": model_hash,
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "report": str(Path(report).resolve()) if report else None,
    }
    history: list[dict[str, Any]] = []
    if pointer_path(serve_dir).is_file():
        old = read_pointer(serve_dir)
        history = [*old.pop("history"), old]
    pointer = {**entry, "history": history}
    _write_pointer(pointer_path(serve_dir), pointer)
    return pointer


def rollback(serve_dir: str | Path) -> dict[str, Any]:
    """Make the previous entry current again (the rolled-back entry is dropped)."""
    pointer = read_pointer(serve_dir)
    if not pointer["history"]:
        raise UserError(f"{pointer_path(serve_dir)}: nothing to roll back to (no earlier model)")
    *older, previous = pointer["history"]
    restored = {**previous, "history": older, "rolled_back_from": pointer["model"]}
    _write_pointer(pointer_path(serve_dir), restored)
    return restored


def refresh_space(serve_dir: str | Path, space_dir: str | Path) -> Path:
    """Rebuild the Space bundle (serve/space.py) around the model `current.json` names: the Space serves what
    `tunelab serve SERVE_DIR` serves. The Space ships a q4_k_m GGUF, so the current model must be one."""
    from tunelab.serve.space import GGUF_NAME, build_run_space, build_space

    read_pointer(serve_dir)  # a clear error when there is no pointer yet
    model = resolve_model(serve_dir)
    if model.name != GGUF_NAME:
        raise UserError(
            f"--space: the current model {model} is not a {GGUF_NAME} export "
            "(run `tunelab export RUN` before promoting it)"
        )
    if (model.parent / "export.json").is_file() and (model.parent.parent / "config.yaml").is_file():
        build_run_space(model.parent.parent, Path(space_dir), None)  # a run's export: its title and license
    else:
        build_space(Path(space_dir), model.parent, f"{model.parent.name} chat", "other", None)
    return Path(space_dir) / GGUF_NAME
