"""Atomic writes: a reader (or a crash) sees the old file/folder or the new one, never half of either.

Everything is built under a temp name in the same folder (same filesystem, so the rename is atomic), fsynced,
renamed over the target, and the parent folder is fsynced so the rename itself survives a power cut. Temp
names are `.<name>.tmp-*`: a SIGKILL can leave one behind, and the owner of the folder may sweep them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(folder: Path) -> None:
    """Make a rename/creation inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (itself included)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(folder)


def temp_name(path: Path) -> str:
    return f".{path.name}.tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file path next to `path` for a writer that takes a file name (a converter, sqlite, a stream).

    When the block ends without an exception the file is fsynced and renamed over `path`; otherwise removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically and durably."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write `records` as JSON Lines (UTF-8, one per line) atomically and durably; returns how many were written.

    They stream into the temp file (a generator of a large export is never held whole), so a reader such as
    `data prepare` or a Hub upload sees the previous file or the complete new one, never a half-written one."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def jsonl_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", object) for each non-blank line of a JSON Lines file a command reads whole (prompt files,
    regression sets, plans); a line that is not a JSON object is a UserError naming FILE:LINE. Training data has its
    own reader, which logs bad records and goes on (`data.readers.iter_jsonl`)."""
    from tunelab.errors import UserError

    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a folder: yields an empty sibling temp folder; on success it is fsynced and replaces `path`.

    An existing `path` is moved aside first and deleted after the rename, so there is never a moment without
    one complete folder at `path` for longer than two renames. On an exception the temp folder is removed and
    `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_name(path)))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(folder: Path) -> None:
    """Delete the temp files/folders that a killed atomic_write/atomic_folder left directly in `folder`."""
    for pattern in (".*.tmp-*", ".*.old-*"):
        for leftover in Path(folder).glob(pattern):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def cache_dir() -> Path:
    """tunelab's per-user cache (dequantised models, per-machine measurements); TUNELAB_CACHE moves it."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def read_json_cache(name: str) -> dict:
    """A JSON cache file under cache_dir(), or {} when it is missing or unreadable."""
    try:
        cached = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def write_json_cache(name: str, cached: dict) -> None:
    """Store a JSON cache file atomically; one that cannot be written costs a re-measurement next time, nothing more."""
    try:
        atomic_write(cache_dir() / name, json.dumps(cached, indent=1))
    except OSError:
        pass
