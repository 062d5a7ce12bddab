"""Model resolution and loading: embedded GGUF, local folders, .gguf files, Hub ids; and chat inference.

The names below load on first use, so `tunelab.models.inference` (vendored alone into a Space bundle) does not
pull in the loading code and its config/transformers imports.
"""

import importlib

__all__ = ["ModelError", "load_model", "load_tokenizer", "resolve_model_path"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("tunelab.models.loading"), name)
    raise AttributeError(f"module 'tunelab.models' has no attribute {name!r}")
