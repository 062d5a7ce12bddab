"""tunelab: fine-tune small chat models with LoRA on a CPU, export, serve, and learn from feedback."""

__version__ = "0.1.0"
