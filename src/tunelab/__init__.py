"""tunelab: fine-tune small chat models with LoRA on a CPU, export, serve, and learn from feedback."""

import warnings

__version__ = "0.1.0"

# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias on every adapter wrap, so every
# model load printed a FutureWarning that no tunelab user can act on. Only that message is silenced.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
