"""A run folder, as `tunelab train` writes it, and loading the tuned model back from it.

    RUN/config.yaml          resolved config of the run
    RUN/adapter/             PEFT adapter (adapter_config.json, adapter_model.safetensors)
    RUN/tokenizer/           tokenizer with the chat template used in training
    RUN/summary.json         steps, tokens, time, tokens/s, peak memory, final losses, base model path
    RUN/metrics.jsonl        one JSON line per logged step / evaluation
    RUN/checkpoints/step-N/  resumable checkpoints (see tunelab.train.checkpoint)
    RUN/eval/                tunelab eval outputs
"""

from __future__ import annotations

from pathlib import Path

from tunelab.config import Config, load_config
from tunelab.errors import UserError


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "adapter" / "adapter_config.json").is_file() and (path / "config.yaml").is_file()


def run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a finished tunelab run (needs adapter/ and config.yaml; run `tunelab train` first)")
    return load_config(run_dir / "config.yaml")


def load_run_tokenizer(run_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(run_dir) / "tokenizer"))


def load_run_model(run_dir: str | Path, merge: bool = False, dtype=None):
    """Base model + the run's adapter (a PeftModel), or merged into a plain model when `merge`."""
    from peft import PeftModel

    from tunelab.models.loading import load_model

    cfg = run_config(run_dir)
    base = load_model(cfg.model, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(Path(run_dir) / "adapter"))
    model.eval()
    if merge:
        model = model.merge_and_unload()
    return model, load_run_tokenizer(run_dir)
