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
        raise UserError(
            f"{run_dir}: not a finished tunelab run (needs adapter/ and config.yaml; run `tunelab train` first)"
        )
    return load_config(run_dir / "config.yaml")


def load_run_tokenizer(run_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(run_dir) / "tokenizer"))


def reload_dtype(device_type: str):
    """The dtype a run's base is reloaded in: fp32 on CPU; on CUDA the GPU's native half precision."""
    import torch

    from tunelab.hardware import cuda_capability

    if device_type != "cuda":
        return torch.float32
    capability = cuda_capability()
    return torch.bfloat16 if capability is not None and capability >= (8, 0) else torch.float16


def load_run_model(run_dir: str | Path, merge: bool = False, dtype=None, device=None, cfg: Config | None = None):
    """Base model + the run's adapter (a PeftModel), or merged into a plain model when `merge`.

    A QLoRA run (model.load_in_4bit/8bit) is reloaded UNQUANTISED: the adapter was trained against the
    dequantised weights, and merging into bitsandbytes weights is lossy and unreadable for llama.cpp's
    converter. So evaluation, export and serving work on any machine, CUDA or not. `device` defaults to the
    CPU; `dtype` to fp32, or for a quantised run on CUDA to bf16/fp16 (what the GPU has natively).
    """
    import torch
    from peft import PeftModel

    from tunelab.models.loading import load_model

    cfg = cfg or run_config(run_dir)
    device = torch.device(device or "cpu")
    quantized = cfg.model.load_in_4bit or cfg.model.load_in_8bit
    if dtype is None:
        dtype = reload_dtype(device.type) if quantized else torch.float32
    model_cfg = cfg.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False})
    base = load_model(model_cfg, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, str(Path(run_dir) / "adapter"))
    model.eval()
    if merge:
        model = model.merge_and_unload()  # in `dtype`, never into quantised weights
    return model, load_run_tokenizer(run_dir)
