"""4-bit and 8-bit bases (bitsandbytes), on a CPU or a CUDA GPU.

bitsandbytes >= 0.49 has a CPU backend next to its CUDA one, so `model.load_in_4bit` / `load_in_8bit` and
`train.optimizer: adamw_8bit` run wherever tunelab runs. What this module holds:
- `check_bitsandbytes(key, feature)`: before anything is loaded, runs the bitsandbytes ops the feature needs on a
  few numbers on this machine's device; a missing library or op becomes one `UserError` line naming it;
- `quantization_config(cfg, compute_dtype)`: the `BitsAndBytesConfig` a config asks for;
- `is_quantized(model)` / `describe_quantization(model)`: the one predicate the training path consults (the
  architecture line, the fused LoRA layers, torch.compile);
- `dequantized(model)`: the quantised base's weights as plain `nn.Linear`s (what a QLoRA adapter was trained on).
"""

from __future__ import annotations

import functools

from tunelab.config import ModelConfig
from tunelab.errors import UserError

INSTALL = "pip install bitsandbytes==0.50.2"


class QuantizationError(UserError):
    """bitsandbytes is missing, or lacks an op a 4/8-bit base or adamw_8bit needs on this machine."""


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_key(cfg: ModelConfig) -> str | None:
    """The config key that asks for a quantised base, or None."""
    return "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit" if cfg.load_in_8bit else None


@functools.cache
def missing_op(feature: str, device: str) -> str | None:
    """None when bitsandbytes runs `feature` ("4bit:nf4", "4bit:fp4", "8bit", "adamw_8bit") on `device`, else what
    fails (the op and bitsandbytes' first line about it)."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}; {INSTALL})"
    op = feature
    try:
        torch.manual_seed(0)
        if feature.startswith("4bit"):
            quant_type = feature.split(":")[1]
            weight = torch.randn(64, 64, device=device)
            op = f"quantize_4bit({quant_type})"
            packed, state = bnb.functional.quantize_4bit(weight, quant_type=quant_type, compress_statistics=True)
            op = "dequantize_4bit"
            bnb.functional.dequantize_4bit(packed, state)
            op = "matmul_4bit (forward and backward)"
            x = torch.randn(2, 64, device=device, requires_grad=True)
            bnb.matmul_4bit(x, packed.t(), quant_state=state).sum().backward()
        elif feature == "8bit":
            op = "Linear8bitLt (forward and backward)"
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
            x = torch.randn(2, 64, device=device, requires_grad=True)
            layer(x).sum().backward()
        elif feature == "adamw_8bit":
            op = "AdamW8bit step (8-bit blockwise states)"
            param = torch.nn.Parameter(torch.randn(64, 64, device=device))  # >= 4096 values: 8-bit states
            optimizer = bnb.optim.AdamW8bit([param])
            param.grad = torch.randn_like(param)
            optimizer.step()
        else:
            raise ValueError(feature)
    except Exception as exc:  # any failure of the library is reported as the op it broke
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {op} on this {device} ({text[:200]})"
    return None


def check_bitsandbytes(key: str, feature: str) -> None:
    """One clear line instead of a traceback mid-run when bitsandbytes cannot do `feature` here."""
    problem = missing_op(feature, device_type())
    if problem:
        raise QuantizationError(f"{key}: {problem}")


def check_quantization_supported(cfg: ModelConfig) -> None:
    key = quantization_key(cfg)
    if key == "load_in_4bit":
        check_bitsandbytes(f"model.{key}", f"4bit:{cfg.bnb_4bit_quant_type}")
    elif key == "load_in_8bit":
        check_bitsandbytes(f"model.{key}", "8bit")


def quantization_config(cfg: ModelConfig, compute_dtype):
    """The BitsAndBytesConfig for `cfg` (None for an unquantised base); 4-bit layers compute in `compute_dtype`."""
    if quantization_key(cfg) is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=cfg.load_in_4bit,
        load_in_8bit=cfg.load_in_8bit,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_layers(model) -> list:
    """The bitsandbytes layers (Linear4bit, Linear8bitLt) of a model, also inside PEFT/DDP wrappers."""
    return [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes.")]


def is_quantized(model) -> bool:
    return bool(quantized_layers(model))


def describe_quantization(model) -> str | None:
    """'4-bit nf4 base (double quant, compute bf16)' or '8-bit base', or None for an unquantised model."""
    layers = quantized_layers(model)
    if not layers:
        return None
    weight = layers[0].weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        double = " double quant," if getattr(state, "nested", False) else ""
        compute = str(getattr(layers[0], "compute_dtype", None) or state.dtype).removeprefix("torch.")
        return f"4-bit {state.quant_type} base ({len(layers)} bitsandbytes layers,{double} compute {compute})"
    return f"8-bit base ({len(layers)} bitsandbytes layers)"


def keep_one_layout(model) -> int:
    """Turn off bitsandbytes' CPU inference layout on every 4-bit layer; returns how many were set.

    On a CPU with avx512_bf16, bitsandbytes 0.50 repacks a `Linear4bit` the first time it runs in eval mode without
    gradients: the block scales are rounded to bf16 (double quantisation undone) and its matmul then takes a kernel
    with no backward, for evaluation and for every training step after it. In a training run that first happens at
    the first held-out evaluation: the base silently changes and gradients stop flowing through the base weights,
    so a resumed run (no evaluation yet in that process) diverges from an uninterrupted one. With this off, a 4-bit
    model computes one function in training, evaluation, resume and export."""
    count = 0
    for module in quantized_layers(model):
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def dequantized(model, dtype):
    """The same model with each bitsandbytes layer replaced by an `nn.Linear` holding its dequantised weight in
    `dtype` (NF4 codes x block scales: the weights a QLoRA adapter was trained against). In place; returns it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        raise ValueError("dequantized: not a bitsandbytes-quantised transformers model")
    model = quantizer.dequantize(model, dtype=dtype)
    model.hf_quantizer = None
    return model.to(dtype)
