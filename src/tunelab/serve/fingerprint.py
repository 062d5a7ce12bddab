"""Which weights produced an answer: sha256 over a model's weights files, recorded with every feedback row.

- `.gguf` file: the file itself.
- run folder (adapter/ + config.yaml): the adapter's weights files (the base model is named in its config).
- merged / HF folder: its `*.safetensors` / `*.bin` weights files.

Folders hash each file's name and bytes in sorted order. Hashing a GGUF takes about a second per GB, so a
result is cached per process, keyed by each file's path, size and modification time: the app hashes once at
load, and a file replaced in place gets a new hash.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from tunelab.errors import UserError

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
_CHUNK = 1 << 20


def weights_files(model_path: str | Path) -> list[Path]:
    path = Path(model_path).expanduser()
    if path.is_file():
        return [path]
    folder = path / "adapter" if (path / "adapter").is_dir() else path
    files = sorted({f for pattern in _WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    if not files:
        raise UserError(
            f"{path}: no weights files (.gguf, adapter/*.safetensors, *.safetensors or *.bin) to fingerprint"
        )
    return files


def model_fingerprint(model_path: str | Path) -> str:
    """`sha256:<hex>` of the model's weights files (see module doc)."""
    files = weights_files(model_path)
    stamps = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(stamps)


@functools.lru_cache(maxsize=32)
def _fingerprint(stamps: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    single = len(stamps) == 1
    for name, _, _ in stamps:
        if not single:  # a lone file hashes to its plain sha256 (`sha256sum model.gguf` gives the same)
            digest.update(Path(name).name.encode("utf-8") + b"\0")
        with open(name, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
