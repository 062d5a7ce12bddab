"""Model resolution and loading: embedded GGUF, local folders, .gguf files, Hub ids."""

from tunelab.models.loading import ModelError, load_model, load_tokenizer, resolve_model_path

__all__ = ["ModelError", "load_model", "load_tokenizer", "resolve_model_path"]
