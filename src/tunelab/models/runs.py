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


# Where a QLoRA run's adapter goes (`load_run_model(base=...)`, `tunelab export --merge-into`).
QLORA_BASES = {
    "quantized": "the 4/8-bit base as trained (bitsandbytes layers): the trained model itself",
    "dequantized": "the quantised base's weights dequantised to plain linears: the weights the adapter was trained on",
    "original": "the original, unquantised base checkpoint",
}
DEFAULT_QLORA_BASE = "dequantized"


def is_quantized_run(cfg: Config) -> bool:
    return cfg.model.load_in_4bit or cfg.model.load_in_8bit


def load_run_model(
    run_dir: str | Path,
    merge: bool = False,
    dtype=None,
    device=None,
    cfg: Config | None = None,
    base: str | None = None,
):
    """Base model + the run's adapter (a PeftModel), or merged into a plain model when `merge`.

    A QLoRA run (model.load_in_4bit/8bit) has three bases for its adapter (QLORA_BASES): `quantized`, the trained
    model as it was (bitsandbytes on the CPU or the GPU); `dequantized` (the default), the same NF4/int8 weights
    dequantised into plain linears, which is the same function in `dtype` without bitsandbytes at inference time
    and merges exactly; `original`, the unquantised checkpoint the quantised one was made from (merging into it
    adds the adapter to weights it never saw: the quantisation error comes back). An unquantised run has one base.
    `device` defaults to the CPU; `dtype` to fp32, or for a quantised run on CUDA to bf16/fp16.
    """
    import torch
    from peft import PeftModel

    from tunelab.models.loading import load_model

    cfg = cfg or run_config(run_dir)
    device = torch.device(device or "cpu")
    quantized = is_quantized_run(cfg)
    base = (base or DEFAULT_QLORA_BASE) if quantized else "original"
    if base not in QLORA_BASES:
        raise UserError(f"base: `{base}` is not one of {', '.join(QLORA_BASES)}")
    if dtype is None:
        dtype = reload_dtype(device.type) if quantized else torch.float32
    if base == "original":
        model_cfg = cfg.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False})
        base_model = load_model(model_cfg, dtype=dtype).to(device)
    else:
        where = torch.cuda.current_device() if device.type == "cuda" and device.index is None else str(device)
        base_model = load_model(cfg.model, dtype=dtype, device_map={"": where})
        if base == "dequantized":
            from tunelab.models.quantization import dequantized

            base_model = dequantized(base_model, dtype)
    model = PeftModel.from_pretrained(base_model, str(Path(run_dir) / "adapter"))
    model.eval()
    if merge:
        if base == "quantized":
            raise UserError("merge: a run's adapter is merged into plain weights (base dequantized or original)")
        model = model.merge_and_unload()  # in `dtype`, never into quantised weights
    return model, load_run_tokenizer(run_dir)
